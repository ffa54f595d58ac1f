"""A tiny Lightning run that checkpoints through ckptstore; run it twice to see it resume.

    pip install "ckptstore[integrations]"
    python examples/lightning_example.py            # trains 3 epochs, saves in runs/lightning
    python examples/lightning_example.py --epochs 5  # resumes from last.ckpt, trains 2 more

Every ``*.ckpt`` under ``runs/lightning`` is a ckptstore checkpoint (a directory): the
three best by ``val_loss`` and ``last.ckpt``; ``ckptstore verify runs/lightning/last.ckpt``
checks one.
"""

from __future__ import annotations

import argparse
import os

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

import ckptstore
from ckptstore.integrations.lightning import CkptStoreCheckpointIO, load_module


class Regressor(L.LightningModule):
    def __init__(self, hidden: int = 32, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def data() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = (x**2).sum(1, keepdim=True)
    return (
        DataLoader(TensorDataset(x[:448], y[:448]), batch_size=32, shuffle=True),
        DataLoader(TensorDataset(x[448:], y[448:]), batch_size=64),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--dir", default="runs/lightning")
    args = parser.parse_args()

    L.seed_everything(0)
    checkpoints = ModelCheckpoint(
        dirpath=args.dir, monitor="val_loss", save_top_k=3, save_last=True, every_n_train_steps=7
    )
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        plugins=[CkptStoreCheckpointIO()],  # the only line ckptstore needs
        callbacks=[checkpoints],
        logger=False,
        enable_progress_bar=False,
    )
    last = os.path.join(args.dir, "last.ckpt")
    resume = "last" if os.path.exists(last) else None
    trainer.fit(Regressor(), *data(), ckpt_path=resume)

    print("checkpoints:", sorted(os.listdir(args.dir)))
    print("best:", checkpoints.best_model_path, float(checkpoints.best_model_score))
    model = load_module(Regressor, checkpoints.best_model_path)  # load_from_checkpoint
    print("loaded", type(model).__name__, dict(model.hparams))
    print("global_step in last.ckpt:", ckptstore.read(last)["global_step"])


if __name__ == "__main__":
    main()
