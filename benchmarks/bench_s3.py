"""S3 benchmark: ckptstore against raw s3fs on a real S3-compatible server, same run.

    python benchmarks/bench_s3.py [--size-mb 1000] [--repeats 3] [--throttle-mbps 50]
                                  [--quick] [--parts updown,codecs,loop] [--only ...]
                                  [--workdir DIR] [--out DIR]

The server is moto in server mode (``tests/s3server.py``): its own process on
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
import socket
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# tests/s3server.py: the moto server the test suite uses (appended: nothing shadowed)
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from common import (
    cpu_seconds,
    gpt_adamw_state,
    interleaved,
    machine_info,
    measure,
    rm,
    state_bytes,
    summarize,
    text_batch,
    text_tokens,
    write_json,
)
from s3server import S3Server

import ckptstore
from ckptstore.layout import checkpoint_name
from ckptstore.storage import open_backend
from ckptstore.train.model import GPT, MODEL_SIZES, GPTConfig
from ckptstore.transfer import copy_checkpoint, fetch

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
warnings.filterwarnings("ignore", message="torch.distributed is unavailable")

MB = 1e6
MIB = 1 << 20
RANGE_PIECE = 8 * MIB  # ckptstore.transfer.PIECE_BYTES
RANGE_AHEAD = 4  # pieces in flight in ckptstore.transfer._pieces
TARGET_RATIO = 0.8  # issue: ckptstore >= 0.8x raw s3fs


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


# ---- the server, the link ----------------------------------------------------------
def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (the moto server)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_busy_s() -> float:
    """CPU seconds all processes on this machine have been busy (user, nice, system, irq)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


class RequestCounter:
    """Counts S3 API calls by method: wraps ``S3FileSystem._call_s3``, which every s3fs
    operation and ckptstore's S3 backend go through. Instrumentation only."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._orig: Any = None

    def install(self) -> None:
        import s3fs

        orig = self._orig = s3fs.S3FileSystem._call_s3
        counter = self

        async def counted(fs: Any, method: Any, *args: Any, **kwargs: Any) -> Any:
            with counter._lock:
                counter.counts[str(method)] += 1
            return await orig(fs, method, *args, **kwargs)

        s3fs.S3FileSystem._call_s3 = counted

    def uninstall(self) -> None:
        if self._orig is not None:
            import s3fs

            s3fs.S3FileSystem._call_s3 = self._orig
            self._orig = None

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)


class _Pacer:
    """A shared rate limit: each chunk waits for its slot on a link of ``bps``."""

    def __init__(self, bps: float) -> None:
        self.bps = bps
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def take(self, n: int, stop: threading.Event) -> None:
        with self._lock:
            now = time.monotonic()
            self._next = max(now, self._next) + n / self.bps
            wait = self._next - now
        if wait > 0:
            stop.wait(wait)


class ThrottleProxy:
    """TCP proxy on 127.0.0.1 in front of ``target_port``, ``mbps`` MB/s per direction,
    shared by every connection (one link, not one limit per connection)."""

    CHUNK = 64 * 1024

    def __init__(self, target_port: int, mbps: float) -> None:
        self.target = ("127.0.0.1", target_port)
        self.up = _Pacer(mbps * MB)
        self.down = _Pacer(mbps * MB)
        self._stop = threading.Event()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._accept = threading.Thread(target=self._accept_loop, name="throttle-accept")

    def start(self) -> ThrottleProxy:
        self._accept.start()
        return self

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.settimeout(0.2)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks += [client, upstream]
                for src, dst, pacer in ((client, upstream, self.up), (upstream, client, self.down)):
                    t = threading.Thread(
                        target=self._pump, args=(src, dst, pacer), name="throttle-pump"
                    )
                    self._threads.append(t)
                    t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, pacer: _Pacer) -> None:
        try:
            while not self._stop.is_set():
                try:
                    data = src.recv(self.CHUNK)
                except TimeoutError:
                    continue
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                pacer.take(len(data), self._stop)
                view = memoryview(data)
                while view and not self._stop.is_set():
                    try:
                        view = view[dst.send(view) :]
                    except TimeoutError:
                        continue
        except OSError:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._stop.set()
        self._accept.join(5)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            threads, socks = list(self._threads), list(self._socks)
        for t in threads:
            t.join(5)
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()


# ---- the workload ------------------------------------------------------------------
def pick_config(target_bytes: float) -> GPTConfig:
    """A GPT shape whose fp32 weights + two AdamW moments come closest to the target."""
    layers = 12 if target_bytes >= 600 * MB else 4
    return min(
        (
            GPTConfig(n_layer=layers, n_head=d // 64, n_embd=d, block_size=128)
            for d in range(64, 4097, 64)
        ),
        key=lambda c: abs(12 * c.num_params() - target_bytes),
    )


def build_state(size_mb: float) -> tuple[dict[str, Any], str]:
    cfg = pick_config(size_mb * MB)
    name = f"s3-bench-{cfg.n_layer}x{cfg.n_embd}"
    MODEL_SIZES[name] = cfg  # gpt_adamw_state takes a named size
    state, _, _ = gpt_adamw_state(name)
    return state, name


def files_bytes(manifest: Any) -> int:
    return sum(e.size_bytes for e in manifest.files.values())


class Ctx:
    """What every part shares: the server, a bucket, the work directory."""

    def __init__(self, server: S3Server, work: str, closers: list[Callable[[], Any]]) -> None:
        self.server = server
        self.work = work
        self.closers = closers
        self.bucket = server.new_bucket()
        self.opts = server.options()
        self.pid = server.proc.pid if server.proc else 0
        self.requests = RequestCounter()
        self.requests.install()
        closers.append(self.requests.uninstall)

    def server_cpu(self) -> float:
        return proc_cpu_s(self.pid)

    def timed(self, fn: Callable[[], Any]) -> dict[str, float]:
        """Run ``fn``: wall time, this process's CPU, the server's CPU, CPU used by
        anything else on the machine meanwhile (noise), and S3 requests made."""
        s0, b0, q0 = self.server_cpu(), system_busy_s(), self.requests.snapshot()
        with measure() as m:
            extra = fn()
        if not isinstance(extra, dict):
            extra = {}
        server = self.server_cpu() - s0
        q = self.requests.snapshot() - q0
        return {
            "wall_s": m["wall_s"],
            "cpu_s": m["cpu_s"],
            "server_cpu_s": server,
            "other_cpu_s": max(0.0, system_busy_s() - b0 - m["cpu_s"] - server),
            "requests": float(sum(q.values())),
            "get_requests": float(q["get_object"]),
            **extra,
        }

    def raw_fs(self, opts: dict[str, Any] | None = None) -> Any:
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **(opts or self.opts))

    def checkpointer(self, root: str, **kw: Any) -> ckptstore.Checkpointer:
        ck = ckptstore.Checkpointer(root, **kw)
        self.closers.append(ck.close)
        return ck


# ---- part 1: upload and download ---------------------------------------------------
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


# ---- part 2: time until backed up, per codec ---------------------------------------
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


# ---- part 3: a training loop with backup on and off --------------------------------
LOOP_CFG = GPTConfig(n_layer=4, n_head=6, n_embd=384, block_size=128)
LOOP_BATCH = 8


def run_loop(ctx: Ctx, steps: int, every: int, runs: int) -> dict[str, Any]:
    data = text_tokens()
    T = LOOP_CFG.block_size
    counter = {"n": 0}
    fs = ctx.raw_fs()

    def one(backup: bool, steps: int, every: int) -> dict[str, float]:
        counter["n"] += 1
        torch.manual_seed(0)
        model = GPT(LOOP_CFG)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
        state = ckptstore.TrainState(model=model, optimizer=opt)
        g = torch.Generator().manual_seed(0)
        local = os.path.join(ctx.work, f"loop-{counter['n']}")
        prefix = f"{ctx.bucket}/loop-{counter['n']}"
        kw: dict[str, Any] = {}
        if backup:
            kw = {"backup": f"s3://{prefix}", "backup_options": ctx.opts}
        mgr = ckptstore.CheckpointManager(local, save=ckptstore.SaveEvery(steps=every), **kw)
        try:

            def train_step() -> None:
                x, y = text_batch(data, T, LOOP_BATCH, g)
                _, loss = model(x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            train_step()  # first-step allocations, not timed
            times, save_steps = [], []
            b0, c0, s0 = system_busy_s(), cpu_seconds(), ctx.server_cpu()
            t_start = time.perf_counter()
            for step in range(steps):
                t0 = time.perf_counter()
                train_step()
                pending = mgr.maybe_save(step, state)
                times.append(time.perf_counter() - t0)
                if pending is not None:
                    save_steps.append(times[-1])
            loop_s = time.perf_counter() - t_start
            t0 = time.perf_counter()
            if backup:
                left = mgr.wait_backup()
                assert not left, left
            else:
                mgr.wait()
            drain_s = time.perf_counter() - t0
            cpu_s, server_s = cpu_seconds() - c0, ctx.server_cpu() - s0
            other_s = max(0.0, system_busy_s() - b0 - cpu_s - server_s)
            status = mgr.backup_status()
        finally:
            mgr.close()
            rm(local)
            if backup:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm(prefix, recursive=True)
        times_sorted = sorted(times)
        return {
            "median_step_s": statistics.median(times),
            "mean_step_s": statistics.mean(times),
            "p90_step_s": times_sorted[int(0.9 * (len(times) - 1))],
            "max_step_s": times_sorted[-1],
            "save_step_median_s": statistics.median(save_steps) if save_steps else float("nan"),
            "loop_s": loop_s,
            "drain_s": drain_s,
            "total_s": loop_s + drain_s,
            "cpu_s": cpu_s,
            "server_cpu_s": server_s,
            "other_cpu_s": other_s,
            "backups_skipped": float(len(status.skipped)) if status else 0.0,
        }

    state_mb = 12 * LOOP_CFG.num_params() / MB
    print(
        f"part 3: training loop, GPT {LOOP_CFG.n_layer}x{LOOP_CFG.n_embd} (~{state_mb:.0f} MB "
        f"state), {steps} steps, save every {every}; warm-up run not counted",
        flush=True,
    )
    one(True, max(2 * min(every, 10), 4), min(every, 10))
    raw = interleaved(
        {
            "backup_off": lambda r: one(False, steps, every),
            "backup_on": lambda r: one(True, steps, every),
        },
        runs,
    )
    return {
        "runs": raw,
        "model": {
            "n_layer": LOOP_CFG.n_layer,
            "n_embd": LOOP_CFG.n_embd,
            "n_head": LOOP_CFG.n_head,
            "block_size": LOOP_CFG.block_size,
            "batch": LOOP_BATCH,
            "state_bytes": 12 * LOOP_CFG.num_params(),
        },
        "steps": steps,
        "save_every": every,
    }


# ---- the run -----------------------------------------------------------------------
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
    payload["ratios"] = _ratios(payload)
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


def _ratios(p: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "updown" in p:
        out["updown"] = p["updown"]["ratios"]
    if "codecs" in p:
        s = p["summary"]["codecs"]
        rows = []
        for link in p["codecs"]["links"]:
            for path in ("backup", "direct"):
                base = s[f"{link}/{path}_none"]["until_backed_up_s"]["median"]
                for codec in ("zstd", "auto"):
                    v = s[f"{link}/{path}_{codec}"]["until_backed_up_s"]["median"]
                    rows.append(
                        {"link": link, "path": path, "codec": codec, "ratio_vs_none": v / base}
                    )
        out["codecs"] = rows
    if "loop" in p:
        s = p["summary"]["loop"]
        runs = p["loop"]["runs"]
        out["loop"] = {
            k: s["backup_on"][k]["median"] / s["backup_off"][k]["median"]
            for k in ("median_step_s", "mean_step_s", "loop_s", "total_s")
        }
        # Interleaved: run i of each variant ran back to back, under the same noise.
        out["loop_paired"] = [
            {
                "loop_s_on_over_off": on["loop_s"] / off["loop_s"],
                "median_step_on_over_off": on["median_step_s"] / off["median_step_s"],
                "other_cpu_s_off": off["other_cpu_s"],
                "other_cpu_s_on": on["other_cpu_s"],
            }
            for off, on in zip(runs["backup_off"], runs["backup_on"], strict=True)
        ]
    return out


def print_tables(p: dict[str, Any]) -> None:
    def cell(v: dict[str, float], fmt: str = ".2f") -> str:
        return f"{v['median']:{fmt}} ({v['min']:{fmt}}-{v['max']:{fmt}})"

    if "updown" in p:
        s = p["summary"]["updown"]
        mb = p["workload"]["state_bytes"] / MB
        print(f"\n### Upload and download of a {mb:.0f} MB checkpoint (median (min-max))\n")
        print(
            "| operation | MB/s | wall s | client CPU s | server CPU s | other processes' "
            "CPU s | S3 requests (GETs) |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, v in s.items():
            print(
                f"| {name} | {cell(v['MBps'], '.1f')} | {cell(v['wall_s'])} | "
                f"{cell(v['cpu_s'])} | {cell(v['server_cpu_s'])} | {cell(v['other_cpu_s'])} | "
                f"{v['requests']['median']:.0f} ({v['get_requests']['median']:.0f}) |"
            )
        print(f"\n### ckptstore / raw s3fs (median MB/s; target >= {TARGET_RATIO}x)\n")
        print("| comparison | ckptstore MB/s | raw MB/s | ratio | per-run ratios | met |")
        print("|---|---|---|---|---|---|")
        for r in p["ratios"]["updown"]:
            runs = ", ".join(f"{x:.2f}" for x in r["paired_ratios"])
            print(
                f"| {r['what']} | {r['ours_MBps']:.1f} | {r['baseline_MBps']:.1f} | "
                f"{r['ratio']:.2f} | {runs} | {'yes' if r['met'] else 'NO'} |"
            )
    if "codecs" in p:
        s = p["summary"]["codecs"]
        ratios = {
            (r["link"], r["path"], r["codec"]): r["ratio_vs_none"] for r in p["ratios"]["codecs"]
        }
        print("\n### Time from the save call until committed on S3, per codec (median (min-max))\n")
        print(
            "| link | path | codec | until on S3, s | of which local save s | uploaded MB | "
            "chose zstd (runs) | vs none | other processes' CPU s |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for name, v in s.items():
            link, rest = name.split("/", 1)
            path, codec = rest.split("_", 1)
            local = cell(v["local_save_s"]) if "local_save_s" in v else "-"
            picks = [r["zstd_chosen"] for r in p["codecs"]["runs"][name]]
            chose = f"{sum(picks):.0f}/{len(picks)}"
            ratio = ratios.get((link, path, codec))
            print(
                f"| {link} | {'local save + copy_checkpoint' if path == 'backup' else 'direct'} | "
                f"{codec} | {cell(v['until_backed_up_s'])} | {local} | "
                f"{v['uploaded_bytes']['median'] / MB:.0f} | {chose} | "
                f"{'' if ratio is None else f'{ratio:.2f}'} | {cell(v['other_cpu_s'])} |"
            )
    if "loop" in p:
        s = p["summary"]["loop"]
        lp = p["loop"]
        print(
            f"\n### Training loop, {lp['steps']} steps, save every {lp['save_every']} "
            f"(~{lp['model']['state_bytes'] / MB:.0f} MB state; median (min-max) over runs)\n"
        )
        print(
            "| backup | median step s | mean step s | p90 step s | max step s | saving step s | "
            "loop s | drain at end s | skipped | server CPU s | other processes' CPU s |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, v in s.items():
            print(
                f"| {name} | {cell(v['median_step_s'], '.3f')} | {cell(v['mean_step_s'], '.3f')} | "
                f"{cell(v['p90_step_s'], '.3f')} | {cell(v['max_step_s'], '.3f')} | "
                f"{cell(v['save_step_median_s'], '.3f')} | {cell(v['loop_s'])} | "
                f"{cell(v['drain_s'])} | {v['backups_skipped']['median']:.0f} | "
                f"{cell(v['server_cpu_s'])} | {cell(v['other_cpu_s'])} |"
            )
        r = p["ratios"]["loop"]
        print(
            "\nbackup on / off (ratio of medians): "
            + ", ".join(f"{k} {v:.3f}" for k, v in r.items())
        )
        print("\n| run | loop s on/off | median step on/off | other processes' CPU s (off, on) |")
        print("|---|---|---|---|")
        for i, q in enumerate(p["ratios"].get("loop_paired", [])):
            print(
                f"| {i + 1} | {q['loop_s_on_over_off']:.3f} | {q['median_step_on_over_off']:.3f} | "
                f"{q['other_cpu_s_off']:.1f}, {q['other_cpu_s_on']:.1f} |"
            )


if __name__ == "__main__":
    sys.exit(main())
