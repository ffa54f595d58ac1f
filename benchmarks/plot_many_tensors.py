"""One per-tensor plot from several ``ckptstore bench --tensors`` results (issue 15).

A run at 200,000 tensors takes long enough to be run on its own; this puts its rows
beside those of the 1,000-40,000 run:

    python benchmarks/plot_many_tensors.py A.json B.json --out per-tensor.png
"""

from __future__ import annotations

import argparse
import json

from ckptstore.bench import plots


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="manytensors-*.json files from ckptstore bench")
    ap.add_argument("--out", required=True, help="the PNG to write")
    args = ap.parse_args()
    rows, dates = [], []
    for path in args.results:
        with open(path) as f:
            payload = json.load(f)
        if payload.get("benchmark") != "manytensors":
            ap.error(f"{path} is not a result of ckptstore bench --tensors")
        rows += payload["rows"]
        dates.append(payload.get("started", "?")[:10])
        machine = payload["machine"]
    cores = machine.get("cpu_affinity") or machine.get("cpu_count")
    subtitle = (
        f"{machine.get('cpu_model', '?')}, {cores} cores, torch {machine['torch']} · "
        f"{', '.join(sorted(set(dates)))} · medians"
    )
    print(plots.many_tensors(rows, subtitle, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
