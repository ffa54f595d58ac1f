"""Training throughput with checkpointing every N steps vs. ``--no-checkpoint``.

    python benchmarks/bench_train.py [--size small] [--steps 300] [--save-every 50]
        [--repeats 3] [--device auto] [--out bench-results]

Runs the reference training loop (``python -m ckptstore.train``) as a user would, in
fresh processes, alternating the two configurations (checkpointing on, off) so that
machine noise hits both alike. Validation is off (``--eval-every 0``) so the only
difference between the runs is checkpointing. Reports tokens/s, the median step time,
the time the loop was blocked in ``maybe_save``, and the overhead
``1 - tokens/s(on) / tokens/s(off)`` per pair and its median.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from common import machine_info, summarize, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_run(args: argparse.Namespace, checkpoint: bool, workdir: str, i: int) -> dict:
    report = os.path.join(workdir, f"report-{checkpoint}-{i}.json")
    ckpt_dir = os.path.join(workdir, f"ckpts-{i}")
    cmd = [
        sys.executable, "-m", "ckptstore.train", "--size", args.size,
        "--steps", str(args.steps), "--eval-every", "0", "--log-every", str(args.steps),
        "--device", args.device, "--ckpt-dir", ckpt_dir, "--report", report,
        "--save-every", str(args.save_every), "--keep-last", "2", "--codec", args.codec,
    ]  # fmt: skip
    if not checkpoint:
        cmd.append("--no-checkpoint")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"training run failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    with open(report) as f:
        r = json.load(f)
    subprocess.run(["rm", "-rf", ckpt_dir], check=False)
    times = sorted(r["step_times_s"][5:])  # the first steps warm up allocators and caches
    return {
        "checkpoint": checkpoint,
        "tokens_per_s": r["tokens_per_s"],
        "elapsed_s": r["elapsed_s"],
        "blocked_s": r["blocked_s"],
        "median_step_s": times[len(times) // 2],
        "p90_step_s": times[int(len(times) * 0.9)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--codec", default="auto")
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="ckptstore-bench-train-") as workdir:
        for i in range(args.repeats):
            order = (True, False) if i % 2 == 0 else (False, True)
            pair = {}
            for checkpoint in order:
                r = one_run(args, checkpoint, workdir, i)
                pair[checkpoint] = r
                runs.append(r)
                print(
                    f"run {i} checkpoint={'on ' if checkpoint else 'off'}: "
                    f"{r['tokens_per_s']:,.0f} tok/s, median step {r['median_step_s'] * 1e3:.1f} ms, "
                    f"blocked {r['blocked_s']:.2f} s of {r['elapsed_s']:.1f} s",
                    flush=True,
                )
            pair_overhead = 1 - pair[True]["tokens_per_s"] / pair[False]["tokens_per_s"]
            runs[-1]["pair_overhead"] = pair_overhead
    on = [r for r in runs if r["checkpoint"]]
    off = [r for r in runs if not r["checkpoint"]]
    overheads = [r["pair_overhead"] for r in runs if "pair_overhead" in r]
    result = {
        "machine": {**machine_info(tempfile.gettempdir()), "device": args.device},
        "workload": vars(args),
        "runs": runs,
        "on": {
            k: summarize([r[k] for r in on]) for k in ("tokens_per_s", "median_step_s", "blocked_s")
        },
        "off": {k: summarize([r[k] for r in off]) for k in ("tokens_per_s", "median_step_s")},
        "overhead": summarize(overheads),
    }
    path = write_json(args.out, "train", result)
    med = result["overhead"]["median"]
    print()
    print(
        f"| {args.size}, {args.steps} steps, save every {args.save_every} | checkpointing on | off |"
    )
    print("|---|---|---|")
    print(
        f"| tokens/s (median of {args.repeats}) | {result['on']['tokens_per_s']['median']:,.0f} | "
        f"{result['off']['tokens_per_s']['median']:,.0f} |"
    )
    print(
        f"| median step | {result['on']['median_step_s']['median'] * 1e3:.1f} ms | "
        f"{result['off']['median_step_s']['median'] * 1e3:.1f} ms |"
    )
    print(f"| blocked in maybe_save | {result['on']['blocked_s']['median']:.2f} s | - |")
    print(
        f"\noverhead (median of pairs): {med * 100:.1f}% (pairs: "
        + ", ".join(f"{o * 100:.1f}%" for o in overheads)
        + ")"
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
