"""A tiny LightningModule and trainer for tests/test_lightning.py, and its DDP run.

``python lightning_worker.py ddp WORKDIR`` trains under ``strategy="ddp"`` on two CPU
processes (Lightning starts the second by running this script again), resumes from
``last`` on both, and exits 0 when every check passed. Run by the test in a subprocess
with a timeout, so that a hang fails the test.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from ckptstore.integrations.lightning import CkptStoreCheckpointIO

STEPS_PER_EPOCH = 8


class Tiny(L.LightningModule):
    def __init__(self, hidden: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        )

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, _: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        return [opt], [sched]


class Adapted(Tiny):
    """Fine-tuning: a frozen base layer (1 MB) under a small trainable adapter."""

    def __init__(self, hidden: int = 8, lr: float = 0.05) -> None:
        super().__init__(hidden, lr)
        g = torch.Generator().manual_seed(1)
        self.base = torch.nn.Linear(512, 512)
        with torch.no_grad():
            self.base.weight.copy_(torch.randn(512, 512, generator=g) * 0.02)
        self.base.requires_grad_(False)
        self.down = torch.nn.Linear(512, 4)

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        x, y = batch
        feats = self.base(x.repeat(1, 128))
        return torch.nn.functional.mse_loss(self.net(x) + self.down(feats)[:, :1], y)

    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.hparams.lr)


def loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS_PER_EPOCH * 8, 4, generator=g)
    y = torch.sin(x).sum(1, keepdim=True)
    train = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)
    val = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16)
    return train, val


def trainer(
    dirpath: str,
    *,
    io: CkptStoreCheckpointIO | None = None,
    checkpoint: dict[str, Any] | None = None,
    **kw: Any,
) -> L.Trainer:
    """A CPU trainer saving through ckptstore: top 3 by ``val_loss`` and ``last``, every
    2 steps unless ``checkpoint`` says otherwise (ModelCheckpoint's arguments)."""
    options = {"monitor": "val_loss", "save_top_k": 3, "save_last": True, "every_n_train_steps": 2}
    callback = ModelCheckpoint(dirpath=dirpath, **{**options, **(checkpoint or {})})
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "deterministic": True,
        "val_check_interval": 2,
        "num_sanity_val_steps": 0,
    }
    return L.Trainer(
        plugins=[io or CkptStoreCheckpointIO()], callbacks=[callback], **{**defaults, **kw}
    )


def ddp(workdir: str) -> None:
    dirpath = os.path.join(workdir, "ckpts")
    L.seed_everything(0)
    t = trainer(dirpath, devices=2, strategy="ddp", max_steps=12)
    t.fit(Tiny(), *loaders())
    t.strategy.barrier()
    names = sorted(n for n in os.listdir(dirpath) if not n.startswith("."))
    assert len(names) == 4 and "last.ckpt" in names, names
    L.seed_everything(0)
    t2 = trainer(dirpath, devices=2, strategy="ddp", max_steps=16)
    model = Tiny()
    t2.fit(model, *loaders(), ckpt_path="last")  # every rank reads last.ckpt
    assert t2.global_step == 16, t2.global_step
    names = sorted(n for n in os.listdir(dirpath) if not n.startswith("."))
    assert len(names) == 4 and "last.ckpt" in names, names
    if t2.global_rank == 0:
        with open(os.path.join(workdir, "ok"), "w") as f:
            f.write("ok\n")


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    scenario, workdir = sys.argv[1], sys.argv[2]
    {"ddp": ddp}[scenario](workdir)
