"""S3 benchmark: ckptstore against raw s3fs on a real S3-compatible server, same run.

    python benchmarks/bench_s3.py [--size-mb 1000] [--repeats 3] [--throttle-mbps 50]
                                  [--quick] [--parts updown,codecs,loop] [--only ...]
                                  [--workdir DIR] [--out DIR]

The server is moto in server mode (``ckptstore/storage/testing/s3server.py``): its own process on
127.0.0.1, reached by s3fs over HTTP exactly as AWS or MinIO would be. It shares this
machine's cores with the client, so every figure includes the server's CPU time too
(reported as ``server_cpu_s``, read from /proc).

Workload: GPT + AdamW after 2 real optimizer steps on real text (``common.gpt_adamw_state``,
fp32 weights and both moments), with a GPT shape picked so the state is ~``--size-mb``.

Three parts, each interleaved (A B C A B C ...) over ``--repeats`` runs, medians with
min and max:

1. ``updown``: upload and download of one checkpoint. ckptstore direct mode
   (``Checkpointer("s3://...", codec="none").save`` and ``.load``) and the backup path
   (``copy_checkpoint`` of a local checkpoint, with and without read-back verification,
   and ``fetch``), against raw s3fs on the same bytes (the checkpoint's shard file):
   ``fs.put_file``, ``fs.get_file``, and ranged ``fs.cat_file`` reads of 8 MiB, 4 at a
   time (the access pattern of ckptstore's verification and fetch). Before measuring,
   every contender runs once on a small (~24 MB) state, not counted.
2. ``codecs``: time from the save call until the checkpoint is committed on S3, per
   codec (``none``, ``zstd``, ``auto``), both as the backup tier does it (local save,
   then ``copy_checkpoint`` with verification) and in direct mode, and the bytes
   uploaded. ``auto`` is given one uncounted save first (it decides from what earlier
   saves measured). With ``--throttle-mbps`` the same again through a rate-limited TCP
   proxy (each direction its own limit, shared by all connections) to emulate a link
   slower than the server.
3. ``loop``: a small GPT trained on CPU with ``CheckpointManager(save=SaveEvery(N))``,
   with and without ``backup="s3://..."``: step times, loop time, and the time to drain
   at the end.

Every timed operation also records this process's CPU, the server's CPU, the CPU that
other processes on the machine used meanwhile (``other_cpu_s``: noise from outside), and
the S3 requests made (counted by wrapping ``S3FileSystem._call_s3``).

Results: JSON in --out (machine, workload, every run, medians, ratios) and markdown
tables on stdout.

Caveat, moto: a ranged GET reads the whole object on the server and then slices it, so
each ranged request costs the server O(object size), unlike S3. Every ckptstore read
path uses ranged GETs (load: one per chunk, i.e. at least one per tensor; verification
and fetch: 8 MiB pieces), so downloads here are far slower than they would be against
S3; ``raw_get_ranged`` shows the server's share, and the request counts show why.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, rm, state_bytes, summarize, write_json
from s3bench import MB
from s3bench.codecs import run_codecs
from s3bench.context import Ctx
from s3bench.link import ThrottleProxy
from s3bench.loop import run_loop
from s3bench.report import print_tables, ratios
from s3bench.updown import UPDOWN_NAMES, UPDOWN_NEEDS, run_updown
from s3bench.workload import build_state

from ckptstore.storage.testing.s3server import S3Server
from ckptstore.train.model import MODEL_SIZES

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
warnings.filterwarnings("ignore", message="torch.distributed is unavailable")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size-mb", type=float, default=None, help="state size (default 1000)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved runs (default 3)")
    ap.add_argument(
        "--quick", action="store_true", help="~128 MB, 2 runs, a short loop: a fast check"
    )
    ap.add_argument(
        "--throttle-mbps",
        default="",
        help="comma-separated link speeds (MB/s) for the codec comparison through a "
        "rate-limited proxy, e.g. 50 (default: none)",
    )
    ap.add_argument("--parts", default="updown,codecs,loop", help="which parts to run")
    ap.add_argument(
        "--only",
        default="",
        help="part 1 contenders to run (comma-separated; default all): " + ", ".join(UPDOWN_NAMES),
    )
    ap.add_argument("--loop-steps", type=int, default=None, help="training steps per run (60)")
    ap.add_argument("--loop-every", type=int, default=None, help="save every N steps (20)")
    ap.add_argument("--loop-runs", type=int, default=None, help="runs per variant (3)")
    ap.add_argument("--workdir", default=None, help="where temporary files go (default: /tmp)")
    ap.add_argument("--out", default="bench-results", help="directory for the JSON results")
    args = ap.parse_args(argv)
    quick = args.quick
    args.size_mb = args.size_mb or (128.0 if quick else 1000.0)
    args.repeats = args.repeats or (2 if quick else 3)
    args.loop_steps = args.loop_steps or (30 if quick else 60)
    args.loop_every = args.loop_every or (10 if quick else 20)
    args.loop_runs = args.loop_runs or (2 if quick else 3)
    args.throttles = [float(x) for x in args.throttle_mbps.split(",") if x.strip()]
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - {"updown", "codecs", "loop"}
    if unknown:
        ap.error(f"unknown parts: {sorted(unknown)}")
    args.only = [c.strip() for c in args.only.split(",") if c.strip()] or list(UPDOWN_NAMES)
    if set(args.only) - set(UPDOWN_NAMES):
        ap.error(f"unknown contenders: {sorted(set(args.only) - set(UPDOWN_NAMES))}")
    for needs, first in UPDOWN_NEEDS.items():
        if needs in args.only and first not in args.only:
            ap.error(f"{needs} reads what {first} writes: --only must name both")
    logging.basicConfig(level=logging.WARNING, format="  [%(levelname)s %(name)s] %(message)s")

    work = tempfile.mkdtemp(prefix="bench-s3-", dir=args.workdir)
    server = S3Server()
    proxies: list[ThrottleProxy] = []
    closers: list[Callable[[], Any]] = []
    try:
        server.start()
        print(f"moto server on {server.endpoint} (pid {server.proc.pid}); workdir {work}")
        return _run(args, work, server, proxies, closers)
    finally:
        for close in reversed(closers):
            with contextlib.suppress(Exception):
                close()
        for p in proxies:
            with contextlib.suppress(Exception):
                p.stop()
        server.stop()
        rm(work)


def _run(
    args: argparse.Namespace,
    work: str,
    server: S3Server,
    proxies: list[ThrottleProxy],
    closers: list[Callable[[], Any]],
) -> int:
    ctx = Ctx(server, work, closers)
    started = time.perf_counter()
    payload: dict[str, Any] = {
        "benchmark": "s3",
        "machine": machine_info(work),
        "server": _server_info(),
        "args": {k: v for k, v in vars(args).items()},
        "loadavg_start": os.getloadavg(),
    }
    state: dict[str, Any] | None = None
    if "updown" in args.parts or "codecs" in args.parts:
        print(
            f"building a GPT + AdamW state of ~{args.size_mb:g} MB (2 real steps) ...", flush=True
        )
        state, model_name = build_state(args.size_mb)
        cfg = MODEL_SIZES[model_name]
        payload["workload"] = {
            "what": "GPT + AdamW after 2 real steps (common.gpt_adamw_state), fp32",
            "gpt": {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd},
            "state_bytes": state_bytes(state),
            "repeats": args.repeats,
        }
        print(f"state: {state_bytes(state) / MB:.0f} MB ({model_name})", flush=True)
    if "updown" in args.parts:
        assert state is not None
        payload["updown"] = run_updown(ctx, state, args.repeats, args.only)
    if "codecs" in args.parts:
        assert state is not None
        payload["codecs"] = run_codecs(ctx, state, args.repeats, args.throttles, proxies)
    del state
    if "loop" in args.parts:
        payload["loop"] = run_loop(ctx, args.loop_steps, args.loop_every, args.loop_runs)
    payload["summary"] = {
        part: {
            name: {k: summarize([r[k] for r in runs]) for k in runs[0]}
            for name, runs in payload[part]["runs"].items()
        }
        for part in ("updown", "codecs", "loop")
        if part in payload
    }
    payload["ratios"] = ratios(payload)
    payload["wall_s"] = time.perf_counter() - started
    payload["loadavg_end"] = os.getloadavg()
    path = write_json(args.out, "s3", payload)  # before printing: a table bug loses nothing
    print_tables(payload)
    print(f"\nresults: {path} (whole run {payload['wall_s']:.0f} s)")
    return 0


def _server_info() -> dict[str, Any]:
    from importlib.metadata import version

    out = {"server": "moto (server mode, own process, 127.0.0.1)"}
    for pkg in ("moto", "s3fs", "aiobotocore", "botocore"):
        with contextlib.suppress(Exception):
            out[pkg] = version(pkg)
    return out


if __name__ == "__main__":
    sys.exit(main())
