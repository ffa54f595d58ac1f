"""A short demo of the core engine: train, save asynchronously, restart, restore, check.

    python -m ckptstore.demo [--dir DIR] [--steps 60] [--save-every 10] [--codec auto]

It trains the "small" GPT on text that ships with Python (pydoc's topic help), saves
with ``Checkpointer.save_async`` every few steps and prints one line per save; then it
builds a fresh model and optimizer as a restarted process would, restores the latest
checkpoint, checks that every tensor and value is bit-identical, and trains on.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from typing import Any

import torch

import ckptstore
from ckptstore.train.model import GPT, MODEL_SIZES


def corpus() -> torch.Tensor:
    import pydoc_data.topics as topics

    text = "\n".join(topics.topics.values()).encode()
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def batch(
    data: torch.Tensor, step: int, cfg: Any, batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    ix = torch.randint(len(data) - cfg.block_size - 1, (batch_size,), generator=g)
    x = torch.stack([data[i : i + cfg.block_size] for i in ix])
    y = torch.stack([data[i + 1 : i + 1 + cfg.block_size] for i in ix])
    return x, y


def build(seed: int = 0) -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = GPT(MODEL_SIZES["small"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    return model, opt


def state_of(model: GPT, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "step": step,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--dir",
        default=None,
        help="checkpoint root (default: a new folder under ./demo-checkpoints)",
    )
    ap.add_argument(
        "--steps", type=int, default=60, help="training steps before the restart (default 60)"
    )
    ap.add_argument("--save-every", type=int, default=10, help="save every N steps (default 10)")
    ap.add_argument("--codec", default="auto", help="none | zstd | auto (default)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.save_every < 1:
        ap.error("--steps and --save-every must be >= 1")
    root = args.dir or os.path.join("demo-checkpoints", time.strftime("run-%Y%m%d-%H%M%S"))

    data = corpus()
    model, opt = build()
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"ckptstore {ckptstore.__version__} demo: GPT 'small' ({n_params / 1e6:.2f}M params) + AdamW on CPU"
    )
    print(f"data: pydoc topics, {len(data):,} bytes; checkpoints: {root} (codec {args.codec})")

    stall = 0.0
    train_s = 0.0
    results = []
    with ckptstore.Checkpointer(root, codec=args.codec) as ckpt:
        pending: list[ckptstore.PendingSave] = []
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            x, y = batch(data, step, cfg)
            _, loss = model(x, y)
            opt.zero_grad()
            assert loss is not None
            loss.backward()
            opt.step()
            train_s += time.perf_counter() - t0
            if step % args.save_every == 0:
                t1 = time.perf_counter()
                pending.append(
                    ckpt.save_async(
                        state_of(model, opt, step), step, metadata={"loss": loss.item()}
                    )
                )
                stall += time.perf_counter() - t1
            for p in [p for p in pending if p.done()]:
                pending.remove(p)
                results.append(report(p.wait()))
            if step % args.save_every == 0:
                print(f"  step {step:4d}  loss {loss.item():.4f}", flush=True)
        for p in pending:
            results.append(report(p.wait()))
        final_loss = loss.item()
        expected = {k: v.clone() for k, v in state_of(model, opt, args.steps)["model"].items()}
        expected_next = [train_one(model, opt, data, args.steps + i) for i in (1, 2, 3)]

        print("restart: a fresh model and optimizer, as a new process would build them")
        model2, opt2 = build(seed=1234)
        warm = batch(data, 0, cfg)  # one step so the optimizer has state tensors to load into
        _, warm_loss = model2(*warm)
        assert warm_loss is not None
        warm_loss.backward()
        opt2.step()
        target = state_of(model2, opt2, 0)
        t2 = time.perf_counter()
        info = ckpt.load(target)
        load_s = time.perf_counter() - t2
        model2.load_state_dict(target["model"])
        opt2.load_state_dict(target["optim"])
        same = all(torch.equal(v, target["model"][k]) for k, v in expected.items())
        print(
            f"restored {info.name} in {load_s * 1e3:.0f} ms (step {target['step']}, "
            f"saved loss {info.metadata.get('loss', float('nan')):.4f}); parameters bit-identical: {same}"
        )
        got_next = [train_one(model2, opt2, data, args.steps + i) for i in (1, 2, 3)]
        resumed = got_next == expected_next
        shown = ", ".join(f"{v:.4f}" for v in got_next)
        print(
            f"next 3 losses after restore [{shown}]; identical to the uninterrupted run: {resumed}"
        )
        kept = ckpt.list()

    print(
        f"summary: {args.steps} steps, training {train_s:.2f} s, blocked on checkpoints {stall * 1e3:.0f} ms "
        f"({100 * stall / max(train_s, 1e-9):.1f}%), {len(results)} saves, final loss {final_loss:.4f}"
    )
    print(f"checkpoints in {root}: {', '.join(i.name for i in kept)}")
    return 0 if same and resumed else 1


def train_one(model: GPT, opt: torch.optim.Optimizer, data: torch.Tensor, step: int) -> float:
    x, y = batch(data, step, model.cfg)
    _, loss = model(x, y)
    assert loss is not None
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.item())


def report(r: ckptstore.SaveResult) -> ckptstore.SaveResult:
    print(
        f"  saved {r.name}: stall {r.stall_s * 1e3:.1f} ms, durable after {r.commit_s * 1e3:.0f} ms, "
        f"{mib(r.raw_bytes)} -> {mib(r.stored_bytes)} ({r.codec}, ratio {r.ratio:.2f})",
        flush=True,
    )
    return r


if __name__ == "__main__":
    sys.exit(main())
