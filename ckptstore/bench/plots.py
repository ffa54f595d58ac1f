"""PNG plots of a ``ckptstore bench`` result: stall, time until durable, ratio, scaling.

Each plot is labelled with the workload, the machine and the date; bars are medians and
the whiskers span min to max.
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt


def _subtitle(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    cores = m.get("cpu_affinity") or m.get("cpu_count")
    return (
        f"{payload['workload']['label']} · {m.get('cpu_model', '?')}, {cores} cores, "
        f"torch {m['torch']} · target {m['target_kind']} · {m['date'][:10]}"
    )


def _color(name: str) -> str:
    return "tab:blue" if name.startswith("ckptstore") else "tab:gray"


def _bars(payload: dict[str, Any], key: str, title: str, xlabel: str, path: str) -> str | None:
    summary = payload["comparison"]["summary"]
    rows = [
        (name, s[key])
        for name, s in summary.items()
        if key in s and not math.isnan(s[key]["median"])
    ]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.8))
    names = [r[0] for r in rows]
    med = [r[1]["median"] for r in rows]
    lo = [r[1]["median"] - r[1]["min"] for r in rows]
    hi = [r[1]["max"] - r[1]["median"] for r in rows]
    ax.barh(names, med, xerr=[lo, hi], color=[_color(n) for n in names], capsize=3)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=11)
    fig.suptitle(_subtitle(payload), fontsize=7, y=0.995)
    for y, v in enumerate(med):
        ax.annotate(f" {v:.3g}", (v, y), va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _scaling(payload: dict[str, Any], path: str) -> str | None:
    scaling = payload.get("scaling")
    if not scaling:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = scaling["sizes"]
    names = sorted({n for row in sizes for n in row["summary"]})
    for n in names:
        xs, ys = [], []
        for row in sizes:
            s = row["summary"].get(n, {}).get("durable_s")
            if s:
                xs.append(row["state_bytes"] / 1e6)
                ys.append(s["median"])
        a.plot(xs, ys, "o-", label=n)
    a.set_xscale("log")
    a.set_yscale("log")
    a.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    a.set_xlabel("state size (MB)")
    a.set_ylabel("time until durable (s, median)")
    a.set_title("save time against state size", fontsize=10)
    a.legend(fontsize=7)
    ranks = scaling.get("ranks", {})
    rows = [r for r in ranks.get("rows", []) if "summary" in r]
    for i, n in enumerate(sorted({n for r in rows for n in r["summary"]})):
        for key, style in (("save_s", "o-"), ("load_s", "s--")):
            xs = [r["world"] for r in rows if key in r["summary"].get(n, {})]
            ys = [r["summary"][n][key]["median"] for r in rows if key in r["summary"].get(n, {})]
            if xs:  # one colour per contender: solid for saves, dashed for loads
                b.plot(xs, ys, style, color=f"C{i}", label=f"{n} {key[:-2]}")
    b.set_xlabel("ranks (processes, gloo on CPU)")
    b.set_ylabel("seconds (median; barrier to barrier)")
    b.set_title(f"save and load against ranks ({ranks.get('size', '?')} in total)", fontsize=10)
    if rows:
        b.set_xticks(sorted({r["world"] for r in rows}))
        b.legend(fontsize=7)
    fig.suptitle(_subtitle(payload), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(payload: dict[str, Any], stem: str) -> list[str]:
    """Write every plot this payload has data for; returns their paths."""
    made = [
        _bars(payload, "stall_s", "training-loop stall: how long save() blocks", "seconds", f"{stem}-stall.png"),
        _bars(payload, "durable_s", "time until durable (fsynced / acknowledged)", "seconds", f"{stem}-durable.png"),
        _bars(payload, "ratio", "compression: raw bytes / bytes stored", "ratio (higher is smaller)", f"{stem}-ratio.png"),
        _bars(payload, "cold_s", "load time, cold page cache", "seconds", f"{stem}-load.png"),
        _scaling(payload, f"{stem}-scaling.png"),
    ]  # fmt: skip
    return [p for p in made if p]


_LINE_COLORS = {
    "ckptstore_none": "tab:blue",
    "torch_save": "tab:green",
    "dcp_save": "tab:orange",
    "copy_prealloc": "tab:gray",
}
_PER_TENSOR = (
    ("stall_us_per_tensor", "stall_s", "stall (the save call blocks)"),
    ("durable_us_per_tensor", "durable_s", "until durable"),
    ("cold_us_per_tensor", "cold_s", "load, cold page cache"),
)


def many_tensors(rows: list[dict[str, Any]], subtitle: str, path: str) -> str | None:
    """µs per tensor against the number of tensors (``ckptstore bench --tensors``):
    stall, durable and cold load, one line per contender, the issue's target dashed."""
    rows = sorted(rows, key=lambda r: r["tensors"])
    if not rows:
        return None
    names = list(dict.fromkeys(n for r in rows for n in r["medians"]))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, (key, target_key, title) in zip(axes, _PER_TENSOR, strict=True):
        for name in names:
            pts = [
                (r["tensors"], r["medians"][name][key])
                for r in rows
                if key in r["medians"].get(name, {})
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(
                    xs,
                    ys,
                    marker="o",
                    label=name,
                    color=_LINE_COLORS.get(name),
                )
        tgt = [
            (r["tensors"], r["targets"][target_key] / r["tensors"] * 1e6)
            for r in rows
            if r["targets"].get(target_key)
        ]
        if tgt:
            xs, ys = zip(*tgt, strict=True)
            ax.plot(xs, ys, linestyle="--", color="black", label="target")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tensors")
        ax.set_ylabel("µs per tensor")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(subtitle, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
