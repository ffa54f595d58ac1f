"""``ckptstore bench --interference``: the CPU a background save takes from training (issue 15).

    ckptstore bench --interference --interference-size 512MB --interference-rounds 3

A compute loop (384x384 fp32 matrix multiplies on ``--compute-threads`` torch threads,
standing for a CPU-bound training step) runs alone for ``--interference-alone-s``, then
while a save of the state (8 fp32 tensors, ``--interference-size`` in all) runs in the
background until that save is durable, then alone again as long (after one save of
each, not counted). Reported per contender: the loop's speed during the save as a
fraction of the mean of its speeds alone before and after (1.0: the save cost the loop
nothing), and how long the save took. Contenders: ckptstore
``Checkpointer.save_async`` with codecs none, zstd and auto; DCP ``async_save``;
``torch.save`` + fsync in a thread. Rounds alternate the contenders; medians reported.

Issue 15's target: the loop keeps >= 75% of its speed during a ckptstore save with
codec none. ``uptime``'s load averages before and after are recorded: another busy
process on the machine changes every figure.
"""

from __future__ import annotations

import os
import shutil
import statistics
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

import ckptstore

NAMES = [
    "ckptstore_none",
    "ckptstore_zstd",
    "ckptstore_auto",
    "dcp_async_save",
    "torch_save_thread",
]
TARGET_FRACTION = 0.75  # of the loop's speed alone, during a ckptstore save with codec none
TARGET_NAME = "ckptstore_none"
_TENSORS = 8

Started = Callable[[], bool]  # a save under way: True once it is durable


def compute_rate(done: Callable[[], bool], min_s: float) -> float:
    """Multiplies per second until ``done()`` (and at least ``min_s``)."""
    a = torch.randn(384, 384)
    b = torch.randn(384, 384)
    n = 0
    start = time.perf_counter()
    while True:
        torch.mm(a, b)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_s and done():
            return n / elapsed


def contenders(
    state: dict[str, torch.Tensor], threads: int | None
) -> dict[str, Callable[[str], Started]]:
    """name -> a function that starts a save of ``state`` into a path, in the background."""

    def ckpt(codec: str) -> Callable[[str], Started]:
        def start(path: str) -> Started:
            c = ckptstore.Checkpointer(path, codec=codec, threads=threads)
            pending = c.save_async(state, 1)

            def done() -> bool:
                if not pending.committed.done():
                    return False
                pending.wait()
                c.close()
                return True

            return done

        return start

    def dcp_async(path: str) -> Started:
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fut = dcp.async_save(state, checkpoint_id=path)
        return fut.done

    def torch_save_thread(path: str) -> Started:
        def work() -> None:
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, "ckpt.pt"), "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())

        t = threading.Thread(target=work, name="bench-torch-save")
        t.start()
        return lambda: not t.is_alive()

    return {
        "ckptstore_none": ckpt("none"),
        "ckptstore_zstd": ckpt("zstd"),
        "ckptstore_auto": ckpt("auto"),
        "dcp_async_save": dcp_async,
        "torch_save_thread": torch_save_thread,
    }


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def run(
    directory: str,
    *,
    nbytes: int,
    rounds: int,
    compute_threads: int,
    alone_s: float,
    threads: int | None,
    names: list[str] | None = None,
) -> dict[str, Any]:
    """Measure each contender ``rounds`` times, interleaved, saving under ``directory``
    (a local directory). ``torch.set_num_threads(compute_threads)`` stays set after."""
    torch.set_num_threads(compute_threads)
    state = {f"t{i}": torch.randn(max(1, nbytes // 4 // _TENSORS)) for i in range(_TENSORS)}
    start_of = {k: v for k, v in contenders(state, threads).items() if names is None or k in names}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in start_of}
    # Warm-up, not counted: the first save of each kind imports and allocates what the
    # later ones reuse, and the loop's first multiplies start torch's thread pool.
    compute_rate(lambda: True, min(alone_s, 0.5))
    for name, start in start_of.items():
        path = os.path.join(directory, f"{name}-warmup")
        done = start(path)
        while not done():
            time.sleep(0.01)
        shutil.rmtree(path, ignore_errors=True)
    load_before = _load()
    for rnd in range(rounds):
        for name, start in start_of.items():
            path = os.path.join(directory, f"{name}-{rnd}")
            before = compute_rate(lambda: True, alone_s)
            t0 = time.perf_counter()
            done = start(path)
            during = compute_rate(done, 0.0)
            took = time.perf_counter() - t0
            shutil.rmtree(path, ignore_errors=True)
            after = compute_rate(lambda: True, alone_s)
            # Alone is measured on both sides of the save: on a machine that others use
            # too, the loop's own speed drifts, and its mean is nearer what it would have
            # done during the save than either side alone.
            alone = (before + after) / 2
            runs[name].append(
                {
                    "alone_before_per_s": before,
                    "alone_after_per_s": after,
                    "alone_per_s": alone,
                    "during_per_s": during,
                    "fraction": during / alone,
                    "save_s": took,
                }
            )
            print(
                f"  round {rnd + 1}/{rounds} {name}: loop at {during / alone:.0%} of alone, "
                f"save {took:.2f} s",
                flush=True,
            )
    medians = {
        name: {k: statistics.median(r[k] for r in rs) for k in ("fraction", "save_s")}
        for name, rs in runs.items()
    }
    return {
        "state_bytes": sum(t.nbytes for t in state.values()),
        "tensors": _TENSORS,
        "rounds": rounds,
        "compute_threads": compute_threads,
        "alone_s": alone_s,
        "threads": threads,
        "resolved_threads": ckptstore.CheckpointerConfig(threads=threads).resolved_threads,
        "load_avg_before": load_before,
        "load_avg_after": _load(),
        "target": {"contender": TARGET_NAME, "fraction": TARGET_FRACTION},
        "medians": medians,
        "runs": runs,
    }


def lines(result: dict[str, Any]) -> list[str]:
    """One line per contender: the median fraction, the save's time, the target beside."""
    out = []
    for name, m in result["medians"].items():
        line = f"{name:<18} loop keeps {m['fraction']:4.0%} of its speed, save {m['save_s']:.2f} s"
        if name == result["target"]["contender"]:
            want = result["target"]["fraction"]
            verdict = "met" if m["fraction"] >= want else "MISSED"
            line += f"   (target >= {want:.0%}: {verdict})"
        out.append(line)
    return out


def markdown(result: dict[str, Any]) -> str:
    want = result["target"]["fraction"]
    rows = [
        "| save in the background | loop speed during the save (of alone) | save took | target |",
        "|---|---:|---:|---|",
    ]
    for name, m in result["medians"].items():
        target = ""
        if name == result["target"]["contender"]:
            target = f">= {want:.0%}: " + ("met" if m["fraction"] >= want else "**missed**")
        rows.append(f"| {name} | {m['fraction']:.0%} | {m['save_s']:.2f} s | {target} |")
    return "\n".join(rows) + "\n"
