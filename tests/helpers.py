"""Shared test helpers: realistic states, exact comparison, real subprocesses."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import torch

from ckptstore.train.model import GPT, MODEL_SIZES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_gpt(
    size: str = "tiny", steps: int = 3, seed: int = 0
) -> tuple[GPT, torch.optim.Optimizer, Any]:
    """A GPT + AdamW + LR scheduler after real optimizer steps (moments are non-trivial)."""
    torch.manual_seed(seed)
    cfg = MODEL_SIZES[size]
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    for _ in range(steps):
        x = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
        _, loss = model(x, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched


def every_dtype() -> dict[str, torch.Tensor]:
    """One tensor of every stored dtype, plus zero-size, 0-d and non-contiguous ones."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(37, 11, generator=g)
    out: dict[str, torch.Tensor] = {
        "f64": base.double(),
        "f32": base,
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "c64": torch.complex(base, -base),
        "c128": torch.complex(base.double(), base.double() * 2),
        "i64": torch.randint(-(2**40), 2**40, (5, 7), generator=g),
        "i32": torch.randint(-(2**20), 2**20, (13,), generator=g, dtype=torch.int32),
        "i16": torch.randint(-300, 300, (9,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-128, 127, (33,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (33,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(17, generator=g) > 0.5,
        "f8": base.to(torch.float8_e4m3fn),
        "empty": torch.empty(0, 3),
        "empty_i": torch.empty(0, dtype=torch.int64),
        "scalar": torch.tensor(3.25),
        "scalar_i": torch.tensor(7),
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "expanded": torch.arange(4.0).expand(3, 4),
        "big": torch.randn(300_000, generator=g),  # several chunks with small chunk sizes
    }
    return out


def realistic_state(size: str = "tiny") -> dict[str, Any]:
    """Model + optimizer + scheduler + RNG + Python values, as a training loop saves them."""
    model, opt, sched = train_gpt(size)
    random.seed(5)
    np.random.seed(5)
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "sched": sched.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": _numpy_rng_as_plain(),
        },
        "tensors": every_dtype(),
        "step": 123,
        "epoch": 2,
        "best": 1.5,
        "name": "exp-1",
        "flags": [True, False, None],
        "nested": {"a": {"b": [1, 2.5, "x", (3, 4)]}, "empty": {}},
    }


def _numpy_rng_as_plain() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "name": name,
        "keys": torch.from_numpy(keys.copy()),
        "pos": pos,
        "has_gauss": has_gauss,
        "cached": cached,
    }


def blank_like(obj: Any) -> Any:
    """A target for loading: same structure, tensors zeroed (or NaN), values replaced."""
    if isinstance(obj, torch.Tensor):
        t = torch.zeros(obj.shape, dtype=obj.dtype)
        return t.t().contiguous().t() if obj.dim() == 2 and not obj.is_contiguous() else t
    if isinstance(obj, dict):
        return {k: blank_like(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [blank_like(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(blank_like(v) for v in obj)
    return None


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Bit-exact equality of nested states (tensors compared by bytes, dtype and shape)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        )
        if a.numel():
            ab = a.contiguous().reshape(-1).view(torch.uint8)
            bb = b.contiguous().reshape(-1).view(torch.uint8)
            assert torch.equal(ab, bb), f"{path}: bytes differ"
        return
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (
            f"{path}: keys {sorted(a)} vs {sorted(b) if isinstance(b, dict) else b}"
        )
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
        return
    if isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            assert_same(x, y, f"{path}[{i}]")
        return
    assert a == b and type(a) is type(b), f"{path}: {a!r} vs {b!r}"


def run_python(
    code: str, *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (the repository importable); capture output."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        check=False,
    )
