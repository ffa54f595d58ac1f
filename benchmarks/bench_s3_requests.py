"""S3 requests per save, by kind: fixed 16 MiB parts (before issue 17) against growing parts.

    python benchmarks/bench_s3_requests.py [--size-mb 512] [--tensors 8] [--out DIR]

One process against the moto server on 127.0.0.1 (``ckptstore/storage/testing/s3server.py``),
requests counted in s3fs (``s3bench.link.RequestCounter``). For each part scheme: a
direct save (``Checkpointer("s3://...", codec="none").save``: the shard's size is not
known while it is written) and a backup copy (``copy_checkpoint`` of a local checkpoint,
read back after the upload: its size is known). Issue 17's bound for PUT-class requests
(PutObject, CreateMultipartUpload, UploadPart, CompleteMultipartUpload) per save is
``total bytes / 64 MiB + 2 x ranks`` (1 rank here). JSON in --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from common import write_json
from s3bench.link import RequestCounter

import ckptstore
from ckptstore.storage import open_backend
from ckptstore.storage.testing.s3server import S3Server
from ckptstore.transfer import copy_checkpoint

MIB = 1 << 20
PUTS = ("put_object", "create_multipart_upload", "upload_part", "complete_multipart_upload")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=int, default=512)
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/issue17-s3-requests")
    args = ap.parse_args()
    n = args.size_mb * MIB // 4 // args.tensors
    state = {f"w{i}": torch.randn(n) for i in range(args.tensors)}
    total = sum(t.numel() * 4 for t in state.values())
    server = S3Server().start()
    counter = RequestCounter()
    counter.install()
    rows = []
    try:
        os.environ.update(server.client_env())
        for scheme, max_part in (("fixed 16 MiB parts", 16 * MIB), ("growing parts", 128 * MIB)):
            bucket = server.new_bucket()
            options = {"max_part_bytes": max_part}
            for how in ("direct save", "backup copy"):
                with tempfile.TemporaryDirectory() as tmp:
                    url = f"s3://{bucket}/{how.replace(' ', '-')}"
                    if how == "backup copy":
                        ckptstore.save(
                            state, os.path.join(tmp, "step_00000001"), step=1, codec="none"
                        )
                    before, start = counter.snapshot(), time.perf_counter()
                    if how == "direct save":
                        with ckptstore.Checkpointer(
                            url, codec="none", backend_options=options
                        ) as c:
                            c.save(state, 1)
                    else:
                        remote = open_backend(url, backend_options=options)
                        copy_checkpoint(open_backend(tmp), remote, "step_00000001")
                    seconds = time.perf_counter() - start
                    got = counter.snapshot() - before
                puts = sum(got[k] for k in PUTS)
                row = {
                    "scheme": scheme,
                    "how": how,
                    "bytes": total,
                    "seconds": round(seconds, 2),
                    "requests": dict(sorted(got.items())),
                    "put_class": puts,
                    "bound": total // (64 * MIB) + 2,
                }
                rows.append(row)
                print(
                    f"{scheme:20} {how:12} PUT-class {puts:4} (bound {row['bound']}), "
                    f"all {sum(got.values()):4}, {seconds:.1f} s: {dict(sorted(got.items()))}"
                )
    finally:
        counter.uninstall()
        server.stop()
    write_json(
        args.out, "s3_requests", {"size_mb": args.size_mb, "tensors": args.tensors, "rows": rows}
    )


if __name__ == "__main__":
    main()
