"""save_async stall for N small fp32 tensors, flat (top-level keys) or nested.

PYTHONPATH=TREE python stall2.py 40000 flat|nested
"""

import json
import shutil
import statistics
import sys
import tempfile
import time

import torch

import ckptstore

n = int(sys.argv[1])
flat = sys.argv[2] == "flat"
g = torch.Generator().manual_seed(0)
sizes = torch.randint(64, 2049, (n,), generator=g).tolist()
tensors = {f"layers.{i}.weight": torch.randn(s, generator=g) for i, s in enumerate(sizes)}
state = tensors if flat else {"model": tensors}
root = tempfile.mkdtemp()
stalls = []
with ckptstore.Checkpointer(root, codec="none") as ck:
    for step in range(4):
        t0 = time.perf_counter()
        pending = ck.save_async(state, step, block_until_staged=True)
        stalls.append(time.perf_counter() - t0)
        pending.wait()
shutil.rmtree(root)
print(
    json.dumps(
        {
            "tensors": n,
            "layout": "flat" if flat else "nested",
            "first_s": stalls[0],
            "stalls_s": stalls[1:],
            "median_s": statistics.median(stalls[1:]),
        }
    )
)
