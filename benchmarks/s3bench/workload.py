"""The workload: GPT + AdamW after 2 real optimizer steps on real text, fp32 weights and
both moments, with a GPT shape picked so that the state is about the size asked for.
"""

from __future__ import annotations

from typing import Any

from ckptstore.bench.common import gpt_adamw_state
from ckptstore.train.model import MODEL_SIZES, GPTConfig
from s3bench import MB


def pick_config(target_bytes: float) -> GPTConfig:
    """A GPT shape whose fp32 weights + two AdamW moments come closest to the target."""
    layers = 12 if target_bytes >= 600 * MB else 4
    return min(
        (
            GPTConfig(n_layer=layers, n_head=d // 64, n_embd=d, block_size=128)
            for d in range(64, 4097, 64)
        ),
        key=lambda c: abs(12 * c.num_params() - target_bytes),
    )


def build_state(size_mb: float) -> tuple[dict[str, Any], str]:
    cfg = pick_config(size_mb * MB)
    name = f"s3-bench-{cfg.n_layer}x{cfg.n_embd}"
    MODEL_SIZES[name] = cfg  # gpt_adamw_state takes a named size
    state, _, _ = gpt_adamw_state(name)
    return state, name
