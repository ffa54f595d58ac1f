"""The results of a run as ratios (ckptstore against raw s3fs, codecs against none,
backup on against off) and as the markdown tables printed at the end.
"""

from __future__ import annotations

from typing import Any

from s3bench import MB
from s3bench.updown import TARGET_RATIO


def ratios(p: dict[str, Any]) -> dict[str, Any]:
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
