"""``ckptstore bench --interference``: the CPU a background save takes from training (issue 15).

    ckptstore bench --interference --interference-size 512MB --interference-rounds 3

A compute loop (384x384 fp32 matrix multiplies on ``--compute-threads`` torch threads,
standing for a CPU-bound training step) runs alone for ``--interference-alone-s``, then
while a save of the state (8 fp32 tensors, ``--interference-size`` in all) runs in the
background until that save is durable, then alone again as long (after one save of
each, not counted). Reported per contender: the loop's speed during the save as a
fraction of the mean of its speeds alone before and after (1.0: the save cost the loop
nothing), how long the save took (from the call that starts it), and what the loop
lost: the seconds of its speed alone that it fell behind while the save ran.
Contenders: ckptstore ``Checkpointer.save_async`` with codecs none, zstd and auto (one
``Checkpointer`` each, saving step after step as in a training run); DCP ``async_save``;
``torch.save`` + fsync in a thread. Rounds alternate the contenders; medians reported.

Two more save incrementally (issue 19), codec none, by default and with
``trust_version_counters=True``: their state is as large, 95% of it in 8 tensors that
never change and 5% in one changed in place before each of their saves (an ``add_``,
outside every time measured). Their checkpoints are kept, so that each save links the
unchanged tensors from the last. Also recorded per save: how long the call itself
blocked the caller (the copy, or the hash of what an incremental save may link), which
the loop's figures leave out, and what a ckptstore save wrote.

Issue 15's target: the loop keeps >= 75% of its speed during a ckptstore save with
codec none. ``uptime``'s load averages before and after are recorded, and the
scheduler group's nice (``/proc/self/autogroup``): another busy process on the machine
changes every figure.
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
from ckptstore.layout import checkpoint_name

NAMES = [
    "ckptstore_none",
    "ckptstore_zstd",
    "ckptstore_auto",
    "dcp_async_save",
    "torch_save_thread",
    "ckptstore_incremental",
    "ckptstore_incremental_trust",
]
TARGET_FRACTION = 0.75  # of the loop's speed alone, during a ckptstore save with codec none
TARGET_NAME = "ckptstore_none"
_TENSORS = 8

Started = Callable[[], bool]  # a save under way: True once it is durable
FROZEN = 0.95  # of the incremental contenders' state: the bytes that never change


def compute_rate(done: Callable[[], bool], min_s: float) -> float:
    """Multiplies per second until ``done()`` (and at least ``min_s``)."""
    n, elapsed = compute(done, min_s)
    return n / elapsed


def compute(done: Callable[[], bool], min_s: float) -> tuple[int, float]:
    """Multiply until ``done()`` (and at least ``min_s``): how many, in how many seconds."""
    a = torch.randn(384, 384)
    b = torch.randn(384, 384)
    n = 0
    start = time.perf_counter()
    while True:
        torch.mm(a, b)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_s and done():
            return n, elapsed


class _Durable:
    """A ckptstore save's ``done``; once it is, ``written_bytes``: the raw bytes it wrote
    (an incremental save: not those it linked)."""

    def __init__(self, pending: Any) -> None:
        self.pending = pending
        self.written_bytes: int | None = None

    def __call__(self) -> bool:
        if not self.pending.committed.done():
            return False
        self.written_bytes = self.pending.wait().raw_bytes
        return True


def fine_tuning_state(nbytes: int) -> dict[str, torch.Tensor]:
    """``nbytes`` of fp32: :data:`FROZEN` of them in ``_TENSORS`` tensors, the rest in
    ``adapter`` (the one the incremental contenders change before each save)."""
    frozen = max(1, int(nbytes * FROZEN) // 4 // _TENSORS)
    state = {f"t{i}": torch.randn(frozen) for i in range(_TENSORS)}
    state["adapter"] = torch.randn(max(1, nbytes // 4 - frozen * _TENSORS))
    return state


def contenders(
    state: dict[str, torch.Tensor],
    threads: int | None,
    directory: str,
    opened: dict[str, ckptstore.Checkpointer],
) -> dict[str, Callable[[str], tuple[Started, str | None]]]:
    """name -> a function that starts a save of ``state`` into a path, in the background,
    and returns (its ``done``, the path it writes; None: keep it).

    Each ckptstore contender is one ``Checkpointer`` (kept in ``opened``; the caller
    closes them) that saves a new step each time, as in a training run: its pools and
    staging buffer are made at the first save (the warm-up) and reused. The incremental
    ones save a state of their own (:func:`fine_tuning_state`, as large) and keep their
    checkpoints: the next save links from them."""
    tuning = fine_tuning_state(sum(t.nbytes for t in state.values()))

    def ckpt(codec: str, incremental: str = "") -> Callable[[str], tuple[Started, str | None]]:
        root = os.path.join(directory, f"ckptstore-{codec}{incremental}")
        steps = iter(range(1, 1 << 30))
        options: dict[str, Any] = {"codec": codec, "threads": threads}
        if incremental:
            # no scheduled full saves (full_every=0): every save after the first links
            options.update(
                incremental=True, trust_version_counters=incremental == "-trust", full_every=0
            )

        def start(path: str) -> tuple[Started, str | None]:
            if root not in opened:
                opened[root] = ckptstore.Checkpointer(root, **options)
            c = opened[root]
            step = next(steps)
            pending = c.save_async(tuning if incremental else state, step)
            return _Durable(pending), None if incremental else os.path.join(
                root, checkpoint_name(step)
            )

        if incremental:  # _rounds calls it before each save, outside the times it takes
            start.train = lambda: tuning["adapter"].add_(1.0)  # type: ignore[attr-defined]
        return start

    def dcp_async(path: str) -> tuple[Started, str | None]:
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fut = dcp.async_save(state, checkpoint_id=path)
        return fut.done, path

    def torch_save_thread(path: str) -> tuple[Started, str | None]:
        def work() -> None:
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, "ckpt.pt"), "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())

        t = threading.Thread(target=work, name="bench-torch-save")
        t.start()
        return (lambda: not t.is_alive()), path

    return {
        "ckptstore_none": ckpt("none"),
        "ckptstore_zstd": ckpt("zstd"),
        "ckptstore_auto": ckpt("auto"),
        "dcp_async_save": dcp_async,
        "torch_save_thread": torch_save_thread,
        "ckptstore_incremental": ckpt("none", "-incremental"),
        "ckptstore_incremental_trust": ckpt("none", "-trust"),
    }


def _autogroup() -> str | None:
    try:
        with open("/proc/self/autogroup") as f:
            return f.read().strip()
    except OSError:
        return None


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _rounds(
    start_of: dict[str, Callable[[str], tuple[Started, str | None]]],
    directory: str,
    rounds: int,
    alone_s: float,
) -> dict[str, list[dict[str, float]]]:
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in start_of}
    # Warm-up, not counted: the first save of each kind imports and allocates what the
    # later ones reuse, and the loop's first multiplies start torch's thread pool.
    compute_rate(lambda: True, min(alone_s, 0.5))
    for name, start in start_of.items():
        done, written = start(os.path.join(directory, f"{name}-warmup"))
        while not done():
            time.sleep(0.01)
        if written is not None:
            shutil.rmtree(written, ignore_errors=True)
    for rnd in range(rounds):
        for name, start in start_of.items():
            before = compute_rate(lambda: True, alone_s)
            if (train := getattr(start, "train", None)) is not None:
                train()  # the step that changed what it saves (incremental contenders)
            t0 = time.perf_counter()
            done, written = start(os.path.join(directory, f"{name}-{rnd}"))
            t1 = time.perf_counter()
            steps, elapsed = compute(done, 0.0)
            during = steps / elapsed
            took = time.perf_counter() - t0
            during_s = t0 + took - t1
            if written is not None:
                shutil.rmtree(written, ignore_errors=True)
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
                    "during_steps": steps,  # multiplies while the save ran, in:
                    "during_elapsed_s": elapsed,
                    "fraction": during / alone,
                    "save_s": took,
                    "during_s": during_s,
                    # what the loop lost, in seconds of its speed alone: a save that
                    # only stretches (a lower priority) loses the loop no more.
                    "lost_loop_s": during_s * (1 - during / alone),
                    # the call itself, which the loop waits for (the copy, or the hash
                    # of what an incremental save may link): not in the figures above
                    "blocked_s": t1 - t0,
                }
            )
            if isinstance(done, _Durable) and done.written_bytes is not None:
                runs[name][-1]["written_bytes"] = done.written_bytes  # not those it linked
            print(
                f"  round {rnd + 1}/{rounds} {name}: loop at {during / alone:.0%} of alone, "
                f"save {took:.2f} s",
                flush=True,
            )
    return runs


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
    load_before = _load()
    opened: dict[str, ckptstore.Checkpointer] = {}
    try:
        start_of = {
            k: v
            for k, v in contenders(state, threads, directory, opened).items()
            if names is None or k in names
        }
        runs = _rounds(start_of, directory, rounds, alone_s)
    finally:
        for c in opened.values():
            c.close()
    load_after = _load()
    medians = {
        name: {
            k: statistics.median(r[k] for r in rs)
            for k in ("fraction", "save_s", "lost_loop_s", "blocked_s")
        }
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
        "load_avg_after": load_after,
        "autogroup": _autogroup(),
        "target": {"contender": TARGET_NAME, "fraction": TARGET_FRACTION},
        "medians": medians,
        "runs": runs,
    }


def lines(result: dict[str, Any]) -> list[str]:
    """One line per contender: the median fraction, the save's time, the target beside."""
    out = []
    for name, m in result["medians"].items():
        line = (
            f"{name:<18} loop keeps {m['fraction']:4.0%} of its speed, save {m['save_s']:.2f} s, "
            f"loop lost {m['lost_loop_s']:.2f} s, blocked in the call {m['blocked_s']:.3f} s"
        )
        if name == result["target"]["contender"]:
            want = result["target"]["fraction"]
            verdict = "met" if m["fraction"] >= want else "MISSED"
            line += f"   (target >= {want:.0%}: {verdict})"
        out.append(line)
    return out


def markdown(result: dict[str, Any]) -> str:
    want = result["target"]["fraction"]
    rows = [
        "| save in the background | loop speed during the save (of alone) | save took "
        "| loop lost | target |",
        "|---|---:|---:|---:|---|",
    ]
    for name, m in result["medians"].items():
        target = ""
        if name == result["target"]["contender"]:
            target = f">= {want:.0%}: " + ("met" if m["fraction"] >= want else "**missed**")
        rows.append(
            f"| {name} | {m['fraction']:.0%} | {m['save_s']:.2f} s | {m['lost_loop_s']:.2f} s "
            f"| {target} |"
        )
    return "\n".join(rows) + "\n"
