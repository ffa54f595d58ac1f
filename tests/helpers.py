"""Shared test helpers: states to save (and blank targets to load them into), exact
comparison, real subprocesses. Damaging files on purpose lives in ``damage.py``."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ckptstore import ResumableDataLoader, TrainState
from ckptstore.storage.testing.s3server import free_port  # (torchrun rendezvous ports)
from ckptstore.train.model import GPT, MODEL_SIZES, GPTConfig

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


# A GPT small enough that a CheckpointManager test trains it for real in milliseconds.
TINY_GPT = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8)


def train_state(seed: int = 0, cfg: GPTConfig = TINY_GPT) -> TrainState:
    """Model, AdamW, StepLR and a ResumableDataLoader (6 batches an epoch) as a TrainState."""
    torch.manual_seed(seed)
    data = torch.randint(
        0, 256, (24, cfg.block_size + 1), generator=torch.Generator().manual_seed(1)
    )
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3)
    loader = ResumableDataLoader(TensorDataset(data), batch_size=4, seed=2)  # 6 batches per epoch
    return TrainState(model=model, optimizer=opt, scheduler=sched, dataloader=loader)


def train(mgr, state, steps, *, start=0, metrics=None):
    """Run ``steps`` steps of a :func:`train_state` from ``start`` the way a user loop
    would, offering each step to ``mgr.maybe_save``."""
    step = start
    while step < start + steps:
        epoch = state.dataloader.epoch
        for (batch,) in state.dataloader:
            _, loss = state.model(batch[:, :-1], batch[:, 1:])
            state.optimizer.zero_grad()
            loss.backward()
            state.optimizer.step()
            state.scheduler.step()
            end = state.dataloader.batches_taken == state.dataloader.batches_per_epoch()
            m = metrics(step) if metrics else {"val_loss": loss.item()}
            mgr.maybe_save(step, state, epoch=epoch, end_of_epoch=end, metrics=m)
            step += 1
            if step >= start + steps:
                break
    mgr.wait()
    return step


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


# ---- small seeded states ------------------------------------------------------------


@dataclass(frozen=True)
class Randn:
    """An entry of :func:`build_state`: ``torch.randn(shape)`` drawn from the state's
    generator, then cast to ``dtype`` (so bf16/fp16 hold rounded normal values)."""

    shape: int | tuple[int, ...]
    dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class Randint:
    """An entry of :func:`build_state`: ``torch.randint(low, high, shape, dtype=dtype)``."""

    low: int
    high: int
    shape: int | tuple[int, ...]
    dtype: torch.dtype = torch.int64


def _shape(shape: int | tuple[int, ...]) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)


def build_state(seed: int | None, /, **entries: Any) -> dict[str, Any]:
    """A state dict with ``entries`` as its keys, in order.

    :class:`Randn` and :class:`Randint` entries are drawn, in the order they appear
    (nested dicts depth-first), from one ``torch.Generator`` seeded with ``seed`` (from
    torch's global RNG when ``seed`` is None); a nested dict is built the same way;
    anything else (a tensor, a Python value) is taken as it is. Each test module states
    its own entries, so a module's data stays what its assertions were written for::

        build_state(seed, w=Randn(50_000), b=Randn(10), step=seed)
    """
    g = None if seed is None else torch.Generator().manual_seed(seed)

    def build(entry: Any) -> Any:
        if isinstance(entry, Randn):
            return torch.randn(_shape(entry.shape), generator=g).to(entry.dtype)
        if isinstance(entry, Randint):
            return torch.randint(
                entry.low, entry.high, _shape(entry.shape), generator=g, dtype=entry.dtype
            )
        if isinstance(entry, dict):
            return {k: build(v) for k, v in entry.items()}
        return entry

    return build(entries)


def zero_value(value: Any) -> Any:
    """The zero of a value's type (0, 0.0, "", False): a ``fill`` for :func:`blank_like`."""
    return type(value)()


def blank_like(obj: Any, fill: Any = None) -> Any:
    """A target for loading: same structure, tensors zeroed (same shape and dtype; a
    transposed 2-d tensor stays transposed), every other leaf value replaced by ``fill``,
    or by ``fill(value)`` when ``fill`` is callable (e.g. :func:`zero_value`)."""
    if isinstance(obj, torch.Tensor):
        t = torch.zeros(obj.shape, dtype=obj.dtype)
        return t.t().contiguous().t() if obj.dim() == 2 and not obj.is_contiguous() else t
    if isinstance(obj, dict):
        return {k: blank_like(v, fill) for k, v in obj.items()}
    if isinstance(obj, list):
        return [blank_like(v, fill) for v in obj]
    if isinstance(obj, tuple):
        return tuple(blank_like(v, fill) for v in obj)
    return fill(obj) if callable(fill) else fill


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


def run_example(cwd: Any, script: str, procs: int, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``examples/<script>`` as a user would: plain python, or torchrun with
    ``procs`` gloo processes on loopback."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    launch = [sys.executable]
    if procs > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(procs)]
        launch += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return subprocess.run(
        [*launch, os.path.join(REPO, "examples", script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )


def assert_interrupted_run_resumes_identically(
    tmp_path: Any, script: str, procs: int, args: list[str], *, dir_flag: str, out_flag: str
) -> None:
    """An uninterrupted run, and a run SIGTERM-ed part way then rerun with the same
    command, end with bit-identical weights (``out_flag`` names the file they go to)."""
    whole = run_example(tmp_path, script, procs, dir_flag, "a", *args, out_flag, "a.pt")
    assert whole.returncode == 0, whole.stderr[-3000:]
    stopped = run_example(tmp_path, script, procs, dir_flag, "b", *args, "--stop-after", "8")
    assert stopped.returncode != 0 and "SIGTERM" in stopped.stderr, stopped.stderr[-3000:]
    rerun = run_example(tmp_path, script, procs, dir_flag, "b", *args, out_flag, "b.pt")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from step_" in rerun.stderr
    a = torch.load(os.path.join(tmp_path, "a.pt"), weights_only=True)
    b = torch.load(os.path.join(tmp_path, "b.pt"), weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_two_process_run_resumes_in_one(
    tmp_path: Any, script: str, args: list[str], *, dir_flag: str, out_flag: str
) -> None:
    """A 2-process run SIGTERM-ed part way; the same command in one process resumes
    from its checkpoint and finishes (not bit-identical: the world size changed)."""
    stopped = run_example(tmp_path, script, 2, dir_flag, "b", *args, "--stop-after", "8")
    assert stopped.returncode != 0 and "SIGTERM" in stopped.stderr, stopped.stderr[-3000:]
    rerun = run_example(tmp_path, script, 1, dir_flag, "b", *args, out_flag, "b.pt")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from step_" in rerun.stderr
    assert os.path.exists(os.path.join(tmp_path, "b.pt"))


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m ckptstore ARGS`` in a fresh interpreter, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "ckptstore", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONPATH=REPO),
    )


def script_ends_cleanly(script: str, *args: str) -> None:
    """Run ``script`` (Python source) in a fresh interpreter with ``args``; it must exit
    0 with no failure logged (for what happens as a script ends)."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0 and "failed" not in done.stderr, done.stderr
