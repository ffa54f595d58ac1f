"""Shared pieces of the benchmarks: the workload, machine info, timing, memory, cache eviction.

Used by ``ckptstore bench`` and by the scripts in the repository's ``benchmarks/``.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ckptstore.train.model import GPT, MODEL_SIZES, GPTConfig


def text_tokens() -> torch.Tensor:
    """Real text as byte-level tokens: the pydoc topics that ship with Python."""
    import pydoc_data.topics as topics

    text = "\n".join(topics.topics.values()).encode()
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def text_batch(
    data: torch.Tensor, block: int, batch: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random windows of ``block`` tokens and the same shifted by one."""
    ix = torch.randint(len(data) - block - 1, (batch,), generator=g)
    x = torch.stack([data[i : i + block] for i in ix])
    y = torch.stack([data[i + 1 : i + 1 + block] for i in ix])
    return x, y


def gpt_adamw_state(
    size: str | GPTConfig = "bench-2g",
    steps: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, Any], GPT, Any]:
    """GPT + AdamW after ``steps`` real optimizer steps on real text (pydoc topics).

    ``dtype=torch.bfloat16`` trains a bf16 model, so weights and AdamW moments are bf16.
    """
    torch.manual_seed(seed)
    cfg = MODEL_SIZES[size] if isinstance(size, str) else size
    model = GPT(cfg).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    data = text_tokens()
    g = torch.Generator().manual_seed(seed)
    T = min(cfg.block_size, 128)
    for _ in range(steps):
        x, y = text_batch(data, T, 2, g)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return {"model": model.state_dict(), "optim": opt.state_dict()}, model, opt


def state_bytes(state: Any) -> int:
    seen: set[int] = set()
    total = 0

    def walk(o: Any) -> None:
        nonlocal total
        if isinstance(o, torch.Tensor):
            if o.data_ptr() not in seen:
                seen.add(o.data_ptr())
                total += o.numel() * o.element_size()
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(state)
    return total


def machine_info(target: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "ckptstore": ckptstore_source(),
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["df", "-hT", target], capture_output=True, text=True, check=False
        ).stdout
        info["disk"] = out.strip().splitlines()[-1]
    except OSError:
        pass
    return info


def ckptstore_source() -> dict[str, Any]:
    """The ckptstore that runs: where it lives, and where that is a git checkout's own
    package, its commit and whether the code differs from it (``dirty``: tracked files
    under ``ckptstore/`` or ``benchmarks/``, results aside); None where git cannot tell
    (an installed copy, even inside some other checkout)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    where = os.path.dirname(package)

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "--no-optional-locks", "-C", where, *args],
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    own = top is not None and os.path.realpath(top) == os.path.realpath(where)
    commit = (git("rev-parse", "HEAD") or None) if own else None
    status = None
    if commit:
        code = ["--", "ckptstore", "benchmarks", ":(exclude)benchmarks/results"]
        status = git("status", "--porcelain", "--untracked-files=no", *code)
    return {
        "path": package,
        "commit": commit,
        "dirty": None if status is None else bool(status),
    }


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@contextmanager
def measure() -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    t0, c0 = time.perf_counter(), cpu_seconds()
    yield out
    out["wall_s"] = time.perf_counter() - t0
    out["cpu_s"] = cpu_seconds() - c0


@contextmanager
def frozen_gc() -> Iterator[None]:
    """Hide every object alive now from the cyclic collector for the block (``gc.freeze``).

    The bench collects before each timed save and load, so that no collection starts
    inside one. With torch imported, a full collection walks millions of objects that
    never become garbage: 0.2 s each on the 2-core VM, more than most smoke saves take.
    Frozen, a collection walks only what the bench made since. Nothing is kept alive by
    it: reference counting frees frozen objects as before, and the block's end hands
    them back to the collector."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def evict(path: str) -> None:
    """Drop ``path``'s files from the page cache (a cold read follows)."""
    os.sync()
    paths = (
        [path]
        if os.path.isfile(path)
        else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    )
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fsync_tree(path: str) -> None:
    for d, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def du(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def rm(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def write_json(out_dir: str, name: str, payload: dict[str, Any]) -> str:
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(out_dir, f"{name}-{stamp}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
    return path


def interleaved(
    contenders: dict[str, Callable[[int], dict[str, float]]], runs: int
) -> dict[str, list[dict[str, float]]]:
    """Run A B C A B C ... so machine drift hits every contender alike."""
    results: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
    for r in range(runs):
        for name, fn in contenders.items():
            print(f"  run {r + 1}/{runs}: {name} ...", end="", flush=True)
            res = fn(r)
            results[name].append(res)
            print(
                " " + ", ".join(f"{k} {v:.3f}" for k, v in res.items() if k.endswith("_s")),
                flush=True,
            )
    return results


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def parse_size(text: str) -> int | None:
    """``"250MB"``, ``"2 GB"``, ``"512MiB"`` -> bytes; None if ``text`` is not a size."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        return None
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _gpt_params(n_layer: int, d: int, block: int, vocab: int) -> int:
    # Per block: 2 LayerNorms (4d), qkv (3d^2+3d), proj (d^2+d), MLP (8d^2+5d); then
    # token and position embeddings (tied head) and the final LayerNorm.
    return n_layer * (12 * d * d + 13 * d) + (vocab + block) * d + 2 * d


def gpt_config_for(size: str, dtype: torch.dtype = torch.float32) -> tuple[GPTConfig, int]:
    """A named GPT config, or one sized so weights + AdamW moments take about ``size``.

    Returns the config and the state's size in bytes (weights and two moments).
    """
    elem = torch.empty(0, dtype=dtype).element_size()
    if size in MODEL_SIZES:
        cfg = MODEL_SIZES[size]
    else:
        want = parse_size(size)
        if want is None or want <= 0:
            names = ", ".join(MODEL_SIZES)
            raise ValueError(
                f"--size {size!r} is neither a byte size (e.g. 250MB, 2GB) nor a GPT config ({names})"
            )
        params = want / (3 * elem)
        n_layer = 12 if params > 20e6 else 4 if params > 0.5e6 else 2
        block = 128
        best: GPTConfig | None = None
        for d in range(16, 8192, 16):
            if _gpt_params(n_layer, d, block, 256) > params and best is not None:
                below = _gpt_params(n_layer, best.n_embd, block, 256)
                above = _gpt_params(n_layer, d, block, 256)
                if above - params < params - below:
                    best = GPTConfig(n_layer=n_layer, n_head=_heads(d), n_embd=d, block_size=block)
                break
            best = GPTConfig(n_layer=n_layer, n_head=_heads(d), n_embd=d, block_size=block)
        assert best is not None
        cfg = best
    params = _gpt_params(cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.vocab_size)
    return cfg, 3 * params * elem


def _heads(d: int) -> int:
    """Heads of 64 dimensions where ``d`` allows, else of 32 or 16."""
    for head_dim in (64, 32, 16):
        if d % head_dim == 0 and d >= head_dim:
            return d // head_dim
    return 1


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory over a block, above what was resident when it began.

    On Linux the kernel's high-water mark is reset at the start (``/proc/self/clear_refs``),
    so the peak is exact and costs nothing while the block runs; elsewhere a sampling
    thread stands in (every 5 ms, so a shorter spike can be missed).
    """

    def __init__(self) -> None:
        self.start = 0
        self.peak = 0
        self._exact = False
        self._stop: Any = None
        self._thread: Any = None

    def __enter__(self) -> PeakRSS:
        self.start = rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._exact = True
        except OSError:
            import threading

            self._stop = threading.Event()
            self.peak = self.start

            def sample() -> None:
                while not self._stop.wait(0.005):
                    self.peak = max(self.peak, rss_bytes())

            self._thread = threading.Thread(target=sample, name="bench-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._exact:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.peak = int(line.split()[1]) * 1024
                        break
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())

    @property
    def extra(self) -> int:
        """Bytes above the resident size at the start."""
        return max(0, self.peak - self.start)
