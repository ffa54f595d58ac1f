"""Part 1, ``updown``: upload and download of one checkpoint, ckptstore (direct save and
load, the backup path's ``copy_checkpoint`` with and without read-back, ``fetch``)
against raw s3fs on the same bytes (``put_file``, ``get_file``, ranged ``cat_file``).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ckptstore.bench.common import interleaved
from ckptstore.layout import checkpoint_name
from ckptstore.storage import open_backend
from ckptstore.transfer import copy_checkpoint, fetch
from s3bench import MB, MIB
from s3bench.context import Ctx, files_bytes

RANGE_PIECE = 8 * MIB  # ckptstore.transfer.PIECE_BYTES
RANGE_AHEAD = 4  # pieces in flight in ckptstore.transfer._pieces
TARGET_RATIO = 0.8  # issue: ckptstore >= 0.8x raw s3fs


def updown_contenders(
    ctx: Ctx, state: dict[str, Any], tag: str
) -> dict[str, Callable[[int], dict[str, float]]]:
    """ckptstore and raw s3fs moving the same checkpoint; each leaves the bucket empty
    behind it (or leaves what the next contender in the round reads)."""
    local_root = os.path.join(ctx.work, f"{tag}-local")
    local = ctx.checkpointer(local_root, codec="none")
    res = local.save(state, 1)
    name = res.name
    ckpt_bytes = files_bytes(res.manifest)
    ckdir = os.path.join(local_root, name)
    shard = max((os.path.join(ckdir, f) for f in os.listdir(ckdir)), key=os.path.getsize)
    shard_bytes = os.path.getsize(shard)
    fs = ctx.raw_fs()
    key = f"{ctx.bucket}/{tag}-raw/{os.path.basename(shard)}"
    download = os.path.join(ctx.work, f"{tag}-download")
    direct = ctx.checkpointer(
        f"s3://{ctx.bucket}/{tag}-direct", codec="none", storage_options=ctx.opts
    )
    remote = open_backend(f"s3://{ctx.bucket}/{tag}-copy", storage_options=ctx.opts)
    fetched = open_backend(os.path.join(ctx.work, f"{tag}-fetched"))
    step = {"n": 0}

    def rate(nbytes: int) -> Callable[[dict[str, float]], dict[str, float]]:
        def add(r: dict[str, float]) -> dict[str, float]:
            r["MBps"] = nbytes / r["wall_s"] / MB
            r["bytes"] = float(nbytes)
            return r

        return add

    raw_rate, ck_rate = rate(shard_bytes), rate(ckpt_bytes)

    def raw_put(r: int) -> dict[str, float]:
        return raw_rate(ctx.timed(lambda: fs.put_file(shard, key)))

    def raw_get(r: int) -> dict[str, float]:
        out = raw_rate(ctx.timed(lambda: fs.get_file(key, download)))
        assert os.path.getsize(download) == shard_bytes
        os.remove(download)
        return out

    def raw_get_ranged(r: int) -> dict[str, float]:
        def run() -> None:
            with ThreadPoolExecutor(RANGE_AHEAD) as pool:
                got = sum(
                    pool.map(
                        lambda off: len(
                            fs.cat_file(key, start=off, end=min(off + RANGE_PIECE, shard_bytes))
                        ),
                        range(0, shard_bytes, RANGE_PIECE),
                    )
                )
            assert got == shard_bytes

        out = raw_rate(ctx.timed(run))
        fs.rm(key)
        return out

    def direct_save(r: int) -> dict[str, float]:
        step["n"] += 1
        box: list[Any] = []
        out = ck_rate(ctx.timed(lambda: box.append(direct.save(state, step["n"]))))
        out["staging_s"] = box[0].staging_s
        return out

    def direct_load(r: int) -> dict[str, float]:
        out = ck_rate(ctx.timed(lambda: direct.load(state, step["n"])))
        direct.backend.delete(checkpoint_name(step["n"]))
        return out

    def copy_verify(r: int) -> dict[str, float]:
        out = ck_rate(ctx.timed(lambda: copy_checkpoint(local.backend, remote, name)))
        remote.delete(name)
        return out

    def copy_noverify(r: int) -> dict[str, float]:
        if remote.exists(f"{name}/manifest.json"):  # fetch did not run and remove it
            remote.delete(name)
        return ck_rate(
            ctx.timed(lambda: copy_checkpoint(local.backend, remote, name, verify_upload=False))
        )

    def do_fetch(r: int) -> dict[str, float]:
        out = ck_rate(ctx.timed(lambda: fetch(remote, fetched, name, show_progress=False)))
        fetched.delete(name)
        remote.delete(name)
        return out

    return {
        "raw_put": raw_put,
        "raw_get": raw_get,
        "raw_get_ranged": raw_get_ranged,
        "direct_save": direct_save,
        "direct_load": direct_load,
        "copy_verify": copy_verify,
        "copy_noverify": copy_noverify,
        "fetch": do_fetch,
    }


UPDOWN_PAIRS = [
    # (ckptstore, baseline, what)
    ("direct_save", "raw_put", "upload: direct save (codec none) / s3fs put_file"),
    ("copy_noverify", "raw_put", "upload: copy_checkpoint, verify_upload=False / s3fs put_file"),
    ("copy_verify", "raw_put", "upload: copy_checkpoint, verified (default) / s3fs put_file"),
    ("direct_load", "raw_get", "download: direct load / s3fs get_file"),
    ("fetch", "raw_get", "download: fetch / s3fs get_file"),
    ("direct_load", "raw_get_ranged", "download: direct load / s3fs ranged cat_file"),
    ("fetch", "raw_get_ranged", "download: fetch / s3fs ranged cat_file"),
]


UPDOWN_NAMES = (
    "raw_put",
    "raw_get",
    "raw_get_ranged",
    "direct_save",
    "direct_load",
    "copy_verify",
    "copy_noverify",
    "fetch",
)
# contender -> the one before it in a round that writes what it reads
UPDOWN_NEEDS = {
    "raw_get": "raw_put",
    "raw_get_ranged": "raw_put",
    "direct_load": "direct_save",
    "fetch": "copy_noverify",
}


def run_updown(ctx: Ctx, state: dict[str, Any], repeats: int, only: list[str]) -> dict[str, Any]:
    print("part 1: upload and download; warm-up on a ~24 MB state (not counted)", flush=True)
    g = torch.Generator().manual_seed(1)
    small = {"w": torch.randn(6 * MIB, generator=g)}
    for name, fn in updown_contenders(ctx, small, "warm").items():
        if name in only:
            fn(-1)
            print(f"  {name} ok", flush=True)
    contenders = {k: v for k, v in updown_contenders(ctx, state, "updown").items() if k in only}
    print(f"measuring: {repeats} interleaved runs", flush=True)
    runs = interleaved(contenders, repeats)
    ratios = []
    for ours, base, what in UPDOWN_PAIRS:
        if ours not in runs or base not in runs:
            continue
        a = [r["MBps"] for r in runs[ours]]
        b = [r["MBps"] for r in runs[base]]
        ratio = statistics.median(a) / statistics.median(b)
        ratios.append(
            {
                "what": what,
                "ours": ours,
                "baseline": base,
                "ours_MBps": statistics.median(a),
                "baseline_MBps": statistics.median(b),
                "ratio": ratio,
                "paired_ratios": [x / y for x, y in zip(a, b, strict=True)],
                "limit": TARGET_RATIO,
                "met": ratio >= TARGET_RATIO,
            }
        )
    return {"runs": runs, "ratios": ratios}
