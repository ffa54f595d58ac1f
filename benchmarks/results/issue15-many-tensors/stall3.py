"""save_async stall and durable time for a 200 MB GPT + AdamW state (few large tensors).

PYTHONPATH=TREE python stall3.py
"""

import json
import shutil
import statistics
import tempfile
import time
import warnings

import torch

import ckptstore
from ckptstore.bench import contenders
from ckptstore.bench.common import gpt_adamw_state, gpt_config_for

warnings.filterwarnings("ignore")
cfg, _ = gpt_config_for("200MB", torch.float32)
state, _, _ = gpt_adamw_state(cfg, steps=1, dtype=torch.float32)
root = tempfile.mkdtemp()
stalls = []
durable = []
with ckptstore.Checkpointer(root, codec="none") as ck:
    for step in range(8):
        t0 = time.perf_counter()
        pending = ck.save_async(state, step, block_until_staged=True)
        stalls.append(time.perf_counter() - t0)
        pending.wait()
        durable.append(time.perf_counter() - t0)
shutil.rmtree(root)
print(
    json.dumps(
        {
            "workload": "GPT+AdamW 200MB",
            "tensors": sum(1 for _ in contenders.tensors(state)),
            "stalls_s": stalls[1:],
            "median_stall_s": statistics.median(stalls[1:]),
            "min_stall_s": min(stalls[1:]),
            "median_durable_s": statistics.median(durable[1:]),
        }
    )
)
