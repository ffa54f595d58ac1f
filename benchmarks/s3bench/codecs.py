"""Part 2, ``codecs``: time from the save call until the checkpoint is committed on S3,
per codec, as the backup tier does it (local save, then ``copy_checkpoint``) and in
direct mode; on loopback, and through a rate-limited proxy per ``--throttle-mbps``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from ckptstore.bench.common import interleaved
from ckptstore.storage import open_backend
from ckptstore.transfer import copy_checkpoint
from s3bench.context import Ctx, files_bytes
from s3bench.link import ThrottleProxy

CODECS = ("none", "zstd", "auto")


def codec_contenders(
    ctx: Ctx, state: dict[str, Any], link: str, opts: dict[str, Any]
) -> dict[str, Callable[[int], dict[str, float]]]:
    remote = open_backend(f"s3://{ctx.bucket}/{link}-backup", storage_options=opts)
    step = {"n": 0}
    out: dict[str, Callable[[int], dict[str, float]]] = {}

    def backup(codec: str) -> Callable[[int], dict[str, float]]:
        ck = ctx.checkpointer(os.path.join(ctx.work, f"{link}-local-{codec}"), codec=codec)

        def run(r: int) -> dict[str, float]:
            step["n"] += 1
            n = step["n"]
            box: dict[str, Any] = {}

            def go() -> None:
                t0 = time.perf_counter()
                box["res"] = ck.save(state, n)
                box["saved_s"] = time.perf_counter() - t0
                box["manifest"] = copy_checkpoint(ck.backend, remote, box["res"].name)

            res = ctx.timed(go)
            remote.delete(box["res"].name)
            ck.backend.delete(box["res"].name)
            wall = res.pop("wall_s")
            return {
                "until_backed_up_s": wall,
                "local_save_s": box["saved_s"],
                "upload_s": wall - box["saved_s"],
                "uploaded_bytes": float(files_bytes(box["manifest"])),
                "zstd_chosen": float(box["res"].codec == "zstd"),
                **res,
            }

        return run

    def direct(codec: str) -> Callable[[int], dict[str, float]]:
        ck = ctx.checkpointer(
            f"s3://{ctx.bucket}/{link}-direct-{codec}", codec=codec, storage_options=opts
        )

        def run(r: int) -> dict[str, float]:
            step["n"] += 1
            n = step["n"]
            box: list[Any] = []
            res = ctx.timed(lambda: box.append(ck.save(state, n)))
            ck.backend.delete(box[0].name)
            return {
                "until_backed_up_s": res.pop("wall_s"),
                "uploaded_bytes": float(files_bytes(box[0].manifest)),
                "zstd_chosen": float(box[0].codec == "zstd"),
                **res,
            }

        return run

    for codec in CODECS:
        out[f"{link}/backup_{codec}"] = backup(codec)
    for codec in CODECS:
        out[f"{link}/direct_{codec}"] = direct(codec)
    return out


def run_codecs(
    ctx: Ctx,
    state: dict[str, Any],
    repeats: int,
    throttles: list[float],
    proxies: list[ThrottleProxy],
) -> dict[str, Any]:
    links: list[tuple[str, dict[str, Any], float | None]] = [("loopback", ctx.opts, None)]
    for mbps in throttles:
        proxy = ThrottleProxy(ctx.server.port, mbps).start()
        proxies.append(proxy)
        links.append((f"throttled-{mbps:g}MBps", ctx.server.options(endpoint=proxy.url), mbps))
    result: dict[str, Any] = {"links": {}, "runs": {}}
    for link, opts, mbps in links:
        print(f"part 2: time until backed up per codec, link {link}", flush=True)
        contenders = codec_contenders(ctx, state, link, opts)
        # "auto" decides from what earlier saves measured: one save first, not counted.
        contenders[f"{link}/direct_auto"](-1)
        print(f"  warm-up {link}/direct_auto ok", flush=True)
        runs = interleaved(contenders, repeats)
        result["runs"].update(runs)
        result["links"][link] = {"throttle_MBps": mbps}
    return result
