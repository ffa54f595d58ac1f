"""What a run records and prints: the markdown table of its results, and its command
line and target as they may be written down (without credentials).
"""

from __future__ import annotations

import math
from typing import Any

_SECRET_WORDS = ("secret", "key", "token", "password")


def command_line(argv: list[str]) -> str:
    """The command line as it may be recorded: no credentials from URLs or options."""
    out = []
    for a in argv:
        key, sep, _ = a.partition("=")
        if sep and "://" not in a and any(w in key.lower() for w in _SECRET_WORDS):
            a = key + "=***"
        out.append(redact(a))
    return " ".join(["ckptstore bench", *out])


def redact(text: str) -> str:
    """A target URL as it may be printed: without credentials embedded in it."""
    if "@" in text and "://" in text:
        scheme, rest = text.split("://", 1)
        return scheme + "://" + rest.split("@", 1)[1]
    return text


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
