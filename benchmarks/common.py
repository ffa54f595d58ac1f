"""Shared pieces of the benchmarks: the workload, machine info, timing, cache eviction."""

from __future__ import annotations

import datetime
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

from ckptstore.train.model import GPT, MODEL_SIZES


def gpt_adamw_state(
    size: str = "bench-2g", steps: int = 2, seed: int = 0
) -> tuple[dict[str, Any], GPT, Any]:
    """GPT + AdamW after ``steps`` real optimizer steps on real text (pydoc topics)."""
    import pydoc_data.topics as topics

    torch.manual_seed(seed)
    cfg = MODEL_SIZES[size]
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    text = "\n".join(topics.topics.values()).encode()
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(seed)
    T = min(cfg.block_size, 128)
    for _ in range(steps):
        ix = torch.randint(len(data) - T - 1, (2,), generator=g)
        x = torch.stack([data[i : i + T] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + T] for i in ix])
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
