"""A tiny Lightning run that checkpoints through ckptstore and survives SIGTERM.

    pip install "ckptstore[integrations]"
    python examples/lightning_example.py              # trains 3 epochs, saves in runs/lightning
    python examples/lightning_example.py --epochs 5   # resumes from the newest checkpoint
    python examples/lightning_example.py --devices 2  # DDP on 2 CPU processes
    python examples/lightning_example.py --finetune --incremental  # first layer frozen,
                                                      # linked from save to save (issue 19)

Stop it at any point with SIGTERM (what a scheduler sends before it kills a job): it
finishes the optimizer step it is in, saves ``on_exception.ckpt`` and exits with status
143. Run the same command again: it resumes from there, mid-epoch included, and on the
CPU ends bit-identical to a run never stopped. ``--stop-after N`` sends that SIGTERM
after step N (for tests).

Every ``*.ckpt`` under ``runs/lightning`` is a ckptstore checkpoint (a directory): the
three best by ``val_loss``, ``last.ckpt`` and, after a SIGTERM, ``on_exception.ckpt``;
``ckptstore verify runs/lightning/last.ckpt`` checks one. What makes the resume exact:
every rank stopping after the same step (``ExitOnSIGTERM``), a train loader whose
position is saved (``ckptstore.ResumableDataLoader``), torch's random generator saved
with each checkpoint (``RandomState``), and loaders that draw nothing from that
generator (the validation loader has a generator of its own).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, TensorDataset

import ckptstore
from ckptstore.integrations.lightning import CkptStoreCheckpointIO, load_module


def dataset() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = (x**2).sum(1, keepdim=True)
    return TensorDataset(x[:448], y[:448]), TensorDataset(x[448:], y[448:])


class Regressor(L.LightningModule):
    def __init__(self, hidden: int = 32, lr: float = 0.01, finetune: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, hidden),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.1),  # draws from torch's generator at every training step
            torch.nn.Linear(hidden, 1),
        )
        if finetune:  # fine-tuning: the first layer stays as it is
            self.net[0].requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.hparams.lr)

    def train_dataloader(self):
        # Built once the processes are up, so it takes this rank's share (under DDP).
        # Lightning saves its state_dict() (epoch, batches taken) in every checkpoint
        # and hands it back on resume: the rerun starts at the next batch.
        return ckptstore.ResumableDataLoader(dataset()[0], batch_size=32, shuffle=True, seed=0)

    def val_dataloader(self):
        # A generator of its own: a DataLoader without one draws its iterator's seed from
        # torch's global generator each validation, which a resumed run would do at
        # other moments.
        return DataLoader(dataset()[1], batch_size=64, generator=torch.Generator())


class RandomState(Callback):
    """Saves torch's random generator with each checkpoint and puts it back on resume.

    Lightning saves no generator state; without this, dropout after a resume draws other
    numbers than the uninterrupted run. Every rank is seeded alike here, so rank 0's
    state (the one in the checkpoint) is every rank's.
    """

    def state_dict(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])


class ExitOnSIGTERM(Callback):
    """On SIGTERM, every rank stops after the same training step; SaveOnSIGTERM saves.

    Lightning's own SIGTERM handler broadcasts from inside the signal handler, at whatever
    point each rank happens to be: under DDP that broadcast can meet another rank's
    different collective, and the job hangs (seen with 2 CPU processes). This handler
    only notes the signal; after each training step the ranks add up their notes (one
    tiny all-reduce, nothing in one process) and, if any rank was signalled, all raise
    Lightning's SIGTERMException there, which SaveOnSIGTERM turns into
    ``on_exception.ckpt``. Lightning puts its handlers back when ``fit`` ends.
    """

    def __init__(self) -> None:
        self.signalled = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        flag = torch.tensor([float(self.signalled)], device=trainer.strategy.root_device)
        if trainer.strategy.reduce(flag, reduce_op="sum").item() > 0:
            raise SIGTERMException


class SaveOnSIGTERM(OnExceptionCheckpoint):
    """``on_exception.ckpt`` for a SIGTERM only. Lightning's OnExceptionCheckpoint saves
    on any exception, and one raised while ``fit`` restores a damaged checkpoint came
    before any state was restored: it saved the untrained model as step 0, and the next
    run "resumed" from there (the newest checkpoint), discarding the training done."""

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            super().on_exception(trainer, pl_module, exception)


class StopAfter(Callback):
    """Sends rank 0 SIGTERM after step ``step``, as a scheduler would (for tests)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=-1, help="stop after this many steps")
    parser.add_argument("--dir", default="runs/lightning")
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (DDP if > 1)")
    parser.add_argument("--stop-after", type=int, default=None, help="SIGTERM after step N")
    parser.add_argument("--out", default=None, help="write final weights and optimizer here")
    parser.add_argument("--finetune", action="store_true", help="freeze the first layer")
    parser.add_argument(
        "--incremental",
        action="store_true",
        help="link what did not change since the last save instead of writing it again",
    )
    args = parser.parse_args()

    L.seed_everything(0)
    checkpoints = ModelCheckpoint(
        dirpath=args.dir, monitor="val_loss", save_top_k=3, save_last=True, every_n_train_steps=7
    )
    callbacks = [checkpoints, SaveOnSIGTERM(args.dir), RandomState()]
    if args.stop_after is not None:
        callbacks.append(StopAfter(args.stop_after))
    callbacks.append(ExitOnSIGTERM())  # after StopAfter: it sees that signal the same step
    trainer = L.Trainer(
        max_epochs=args.epochs,
        max_steps=args.steps,
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        plugins=[CkptStoreCheckpointIO(incremental=args.incremental)],  # all ckptstore needs
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=7,
        deterministic=True,
    )
    model = Regressor(finetune=args.finetune)
    try:
        # The newest of last.ckpt and on_exception.ckpt; none (a warning) on the first run.
        trainer.fit(model, ckpt_path="last")
    except SIGTERMException:
        # on_exception.ckpt is written (Lightning's teardown waited for the save).
        print(f"SIGTERM: saved {args.dir}/on_exception.ckpt; rerun to resume", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    if trainer.ckpt_path:
        print(f"resumed from {trainer.ckpt_path}", file=sys.stderr)
    if not trainer.is_global_zero:
        return
    if args.out:
        optimizer = trainer.optimizers[0].state_dict()
        torch.save({"model": model.state_dict(), "optimizer": optimizer}, args.out)
    last = os.path.join(args.dir, "last.ckpt")
    print("checkpoints:", sorted(os.listdir(args.dir)))
    if not checkpoints.best_model_path:  # (no validation ran: --steps below 7)
        print("no checkpoint by val_loss yet")
        return
    print("best:", checkpoints.best_model_path, float(checkpoints.best_model_score))
    best = load_module(Regressor, checkpoints.best_model_path)  # load_from_checkpoint
    print("loaded", type(best).__name__, dict(best.hparams))
    print("global_step in last.ckpt:", ckptstore.read(last)["global_step"])


if __name__ == "__main__":
    main()
