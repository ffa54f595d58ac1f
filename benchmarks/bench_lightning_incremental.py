"""Lightning fine-tuning with ``CkptStoreCheckpointIO(incremental=True)`` against the
plain plugin (issue 19, through the Lightning integration).

    python benchmarks/bench_lightning_incremental.py [--frozen-mb 128] [--steps 20]
        [--every 2] [--rounds 2] [--codec none] [--target DIR] [--out DIR]

A LightningModule with a frozen base (8 square linear layers, ``--frozen-mb`` of fp32
weights) under trainable rank-8 adapters and a head, AdamW over the trainable part, is
trained ``--steps`` steps on the CPU by a real ``lightning.Trainer`` whose
``ModelCheckpoint`` saves every ``--every`` steps (top 3 by a validation loss, and
``last.ckpt``: two saves per step that saves). Each round trains once with the plain
plugin and once with ``incremental=True``, alternating which goes first. Reported per
mode: the training loop's stall in ``save_checkpoint`` and the writer's time per save
(medians), the bytes the process wrote during ``fit`` (``/proc/self/io``), the disk the
kept checkpoints take (a hard-linked file counted once) and the time ``fit`` took. JSON
in --out, with the ckptstore it ran.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning as L
import torch
from common import machine_info, summarize, write_json
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from ckptstore.integrations.lightning import CkptStoreCheckpointIO

LAYERS = 8


class Adapted(L.LightningModule):
    def __init__(self, width: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.base = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(width, width, generator=g) / width**0.5)
            for _ in range(LAYERS)
        )
        self.base.requires_grad_(False)
        self.down = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(width, 8, generator=g) * 0.01) for _ in range(LAYERS)
        )
        self.up = torch.nn.ParameterList(
            torch.nn.Parameter(torch.zeros(8, width)) for _ in range(LAYERS)
        )
        self.head = torch.nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for w, a, b in zip(self.base, self.down, self.up, strict=True):
            x = torch.tanh(x @ w + x @ a @ b)
        return self.head(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


class TimedIO(CkptStoreCheckpointIO):
    """The plugin, timing each save's stall (the caller) and write (the writer thread)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.stalls: list[float] = []
        self.writes: list[float] = []

    def save_checkpoint(self, *args: object, **kwargs: object) -> None:
        start = time.perf_counter()
        super().save_checkpoint(*args, **kwargs)  # type: ignore[arg-type]
        self.stalls.append(time.perf_counter() - start)

    def _write(self, *args: object, **kwargs: object) -> None:
        start = time.perf_counter()
        super()._write(*args, **kwargs)  # type: ignore[arg-type]
        self.writes.append(time.perf_counter() - start)


def written_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("write_bytes:"))


def disk_bytes(dirpath: str) -> int:
    seen: dict[int, int] = {}
    for top, _, files in os.walk(dirpath):
        for f in files:
            st = os.stat(os.path.join(top, f))
            seen[st.st_ino] = st.st_blocks * 512
    return sum(seen.values())


def fit(width: int, dirpath: str, args: argparse.Namespace, incremental: bool) -> dict:
    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, width, generator=g)
    y = x[:, :1].clone()
    train = DataLoader(TensorDataset(x, y), batch_size=8)
    val = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8)
    io = TimedIO(codec=args.codec, incremental=incremental)
    callback = ModelCheckpoint(
        dirpath=dirpath,
        monitor="val_loss",
        save_top_k=3,
        save_last=True,
        every_n_train_steps=args.every,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[io],
        callbacks=[callback],
        max_steps=args.steps,
        val_check_interval=args.every,
        num_sanity_val_steps=0,
    )
    before, start = written_bytes(), time.perf_counter()
    trainer.fit(Adapted(width), train, val)  # ends with the plugin's teardown: all durable
    took, wrote = time.perf_counter() - start, written_bytes() - before
    return {
        "saves": len(io.stalls),
        "stall_s": summarize(io.stalls[2:]),
        "write_s": summarize(io.writes[2:]),
        "written_bytes": wrote,
        "disk_bytes": disk_bytes(dirpath),
        "kept": sorted(os.listdir(dirpath)),
        "fit_s": took,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frozen-mb", type=float, default=128.0, help="frozen weights, MB")
    ap.add_argument("--steps", type=int, default=20, help="training steps per run")
    ap.add_argument("--every", type=int, default=2, help="save every this many steps")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each mode, alternating")
    ap.add_argument("--codec", default="none", help="the plugin's codec (auto, none, zstd)")
    ap.add_argument("--target", default="bench-results/data", help="directory to save into")
    ap.add_argument("--out", default="bench-results", help="directory for the JSON result")
    args = ap.parse_args()
    if args.frozen_mb <= 0:
        ap.error(f"--frozen-mb must be positive (got {args.frozen_mb})")
    if args.every < 1 or args.steps < 3 * args.every:
        ap.error(f"--steps must allow 3 saves of --every {args.every} (got --steps {args.steps})")
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1 (got {args.rounds})")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    width = int(math.sqrt(args.frozen_mb * 1e6 / 4 / LAYERS))
    os.makedirs(args.target, exist_ok=True)
    runs: dict[str, list[dict]] = {"plain": [], "incremental": []}
    for n in range(args.rounds):
        order = ["plain", "incremental"] if n % 2 == 0 else ["incremental", "plain"]
        for mode in order:
            dirpath = tempfile.mkdtemp(prefix=f"lightning-{mode}-", dir=args.target)
            try:
                r = fit(width, dirpath, args, mode == "incremental")
            finally:
                shutil.rmtree(dirpath, ignore_errors=True)
            runs[mode].append(r)
            print(
                f"round {n + 1} {mode:11s}: {r['saves']} saves, stall "
                f"{r['stall_s']['median'] * 1e3:.1f} ms, write {r['write_s']['median'] * 1e3:.1f} ms "
                f"(medians after the first two), wrote {r['written_bytes'] / 1e6:.1f} MB, "
                f"disk {r['disk_bytes'] / 1e6:.1f} MB, fit {r['fit_s']:.2f} s",
                flush=True,
            )

    def med(mode: str, key: str, sub: str | None = None) -> float:
        return statistics.median(r[key][sub] if sub else r[key] for r in runs[mode])

    ratios = {
        "stall": med("incremental", "stall_s", "median") / med("plain", "stall_s", "median"),
        "write": med("incremental", "write_s", "median") / med("plain", "write_s", "median"),
        "written_bytes": med("incremental", "written_bytes") / med("plain", "written_bytes"),
        "disk_bytes": med("incremental", "disk_bytes") / med("plain", "disk_bytes"),
        "fit": med("incremental", "fit_s") / med("plain", "fit_s"),
    }
    print("incremental / plain (medians of the rounds): " + ", ".join(
        f"{k} {v:.3f}x" for k, v in ratios.items()
    ))  # fmt: skip
    state_bytes = LAYERS * width * width * 4
    path = write_json(
        args.out,
        "lightning-incremental",
        {
            "benchmark": "lightning-incremental",
            "command": " ".join(sys.argv),
            "machine": machine_info(args.target),
            "frozen_bytes": state_bytes,
            "runs": runs,
            "ratios": ratios,
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
