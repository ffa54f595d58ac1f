"""The comparison: every contender saves the same state, interleaved (A B C A B C ...)
after one uncounted warm-up save each, then loads it back cold and warm.

A contender that fails is dropped from the run and listed with its error; the others go
on. At most one checkpoint per contender is on storage at a time, and none is left after.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
from typing import Any

from ckptstore.bench import contenders as cont
from ckptstore.bench.common import (
    PeakRSS,
    evict,
    fsync_tree,
    measure,
    rss_bytes,
    state_bytes,
    summarize,
)


def compare(
    state: dict[str, Any],
    target: cont.Target,
    names: list[str] | None,
    runs: int,
    load_runs: int,
    threads: int | None,
) -> dict[str, Any]:
    """Warm-up, ``runs`` interleaved saves and ``load_runs`` loads of every contender."""
    nbytes = state_bytes(state)
    built = cont.build(state, target, threads=threads, names=names)
    active = [c for c in built if isinstance(c, cont.Contender)]
    skipped = [{"name": s.name, "reason": s.reason} for s in built if isinstance(s, cont.Skipped)]
    for s in skipped:
        print(f"  skipped {s['name']}: {s['reason']}", flush=True)
    failed: list[dict[str, str]] = []
    saves: dict[str, list[dict[str, float]]] = {c.name: [] for c in active}
    loads: dict[str, list[dict[str, float]]] = {}
    last: dict[str, str] = {}
    kept: dict[str, float] = {}
    total = (runs + 1) * len(active)
    done = 0

    def fail(c: cont.Contender, what: str, exc: BaseException) -> None:
        failed.append({"name": c.name, "error": f"{what}: {type(exc).__name__}: {exc}"})
        print(f" FAILED ({type(exc).__name__}: {exc}); dropped from this run", flush=True)
        active.remove(c)

    try:
        for r in range(-1, runs):
            for c in list(active):
                done += 1
                label = "warm-up" if r < 0 else f"run {r + 1}/{runs}"
                print(f"  [{done}/{total}] {label} {c.name} ...", end="", flush=True)
                if c.name in last:  # at most one copy per contender on disk
                    target.remove(last.pop(c.name))
                before = rss_bytes()
                try:
                    res, path = _one_save(c, r, target, nbytes)
                except Exception as exc:
                    fail(c, "save", exc)
                    continue
                if path:
                    last[c.name] = path
                if r >= 0:
                    saves[c.name].append(res)
                else:  # what the first save leaves allocated: buffers kept between saves
                    gc.collect()
                    kept[c.name] = max(0, rss_bytes() - before) / 1e6
                print(" " + _brief(res), flush=True)
        loadable = [c for c in active if c.load is not None and c.name in last]
        if load_runs and loadable:
            if target.local:  # what eviction drops must be on disk first
                for c in loadable:
                    if os.path.isdir(last[c.name]):
                        fsync_tree(last[c.name])
            print(f"  loads: {load_runs} interleaved runs, cold then warm", flush=True)
        for r in range(load_runs):
            for c in list(loadable):
                print(f"  load {r + 1}/{load_runs} {c.name} ...", end="", flush=True)
                try:
                    res = _one_load(c, last[c.name], target, nbytes)
                except Exception as exc:
                    fail(c, "load", exc)
                    loadable.remove(c)
                    continue
                loads.setdefault(c.name, []).append(res)
                print(" " + _brief(res), flush=True)
    finally:
        for b in built:
            if isinstance(b, cont.Contender):
                with contextlib.suppress(Exception):
                    b.close()
        for p in last.values():
            with contextlib.suppress(Exception):
                target.remove(p)
    summary: dict[str, dict[str, Any]] = {}
    for name, rows in saves.items():
        if not rows:
            continue
        summary[name] = {k: summarize([row[k] for row in rows]) for k in rows[0]}
        summary[name]["kept_mb"] = summarize([kept.get(name, math.nan)])
    for name, rows in loads.items():
        summary.setdefault(name, {}).update(
            {k: summarize([row[k] for row in rows]) for k in rows[0]}
        )
    return {
        "state_bytes": nbytes,
        "runs": runs,
        "load_runs": load_runs,
        "contenders": {
            c.name: {"what": c.what, "load_into": c.load_into, "weights_only": c.weights_only}
            for c in built
            if isinstance(c, cont.Contender)
        },
        "skipped": skipped,
        "failed": failed,
        "raw": {"saves": saves, "loads": loads},
        "summary": summary,
    }


def _one_save(
    c: cont.Contender, r: int, target: cont.Target, nbytes: int
) -> tuple[dict[str, float], str]:
    assert c.save is not None
    gc.collect()
    with PeakRSS() as mem, measure() as m:
        res, path = c.save(r)
    raw = c.raw_bytes or nbytes
    stored = target.size(path) if path else math.nan
    res.update(
        durable_s=m["wall_s"] if path else math.nan,
        cpu_s=m["cpu_s"],
        cpu_s_per_gb=m["cpu_s"] / (raw / 1e9),
        peak_rss_mb=mem.extra / 1e6,
        bytes=float(stored),
        ratio=raw / stored if path and stored else math.nan,
    )
    if path:
        res["write_mbps"] = raw / 1e6 / m["wall_s"]
    return res, path


def _one_load(c: cont.Contender, path: str, target: cont.Target, nbytes: int) -> dict[str, float]:
    assert c.load is not None
    raw = c.raw_bytes or nbytes
    if target.local:
        evict(path)
    gc.collect()
    with PeakRSS() as mem, measure() as cold:
        out = c.load(path)
    del out
    gc.collect()
    with measure() as warm:
        out = c.load(path)
    del out
    return {
        "cold_s": cold["wall_s"],
        "warm_s": warm["wall_s"],
        "load_cpu_s": cold["cpu_s"],
        "load_peak_rss_mb": mem.extra / 1e6,
        "read_mbps": raw / 1e6 / cold["wall_s"],
    }


def _brief(res: dict[str, float]) -> str:
    keys = ("stall_s", "durable_s", "cold_s", "warm_s")
    return ", ".join(
        f"{k.removesuffix('_s')} {res[k]:.3f} s" for k in keys if k in res and res[k] == res[k]
    )
