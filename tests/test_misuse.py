"""Misuse of the public API fails at once with a ckptstore error that is also the builtin
it means (``except ValueError`` / ``except TypeError`` in callers keeps working), and a
message that names what is wrong; nothing is written.

One table: each row is a call, the ckptstore class it must raise, the builtin that class
must also be, and a fragment of the message.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

import ckptstore
from ckptstore.storage.local import LocalBackend
from ckptstore.storage.testing import FaultyBackend

T = torch.arange(6, dtype=torch.float32)


def state() -> dict[str, Any]:
    return {"w": T.clone(), "b": torch.ones(2)}


def save_with(step: Any) -> Callable[[str], Any]:
    def call(root: str) -> Any:
        with ckptstore.Checkpointer(root) as ckpt:
            return ckpt.save(state(), step)

    return call


def save_state(value: dict[str, Any]) -> Callable[[str], Any]:
    def call(root: str) -> Any:
        with ckptstore.Checkpointer(root) as ckpt:
            return ckpt.save(value, 1)

    return call


def self_referential() -> dict[str, Any]:
    d: dict[str, Any] = {"w": T.clone(), "inner": {}}
    d["inner"]["loop"] = d
    return d


def open_root(root: Any) -> Callable[[str], Any]:
    def call(_: str) -> Any:
        return ckptstore.Checkpointer(root)

    return call


def duplicate_in_flight(root: str) -> Any:
    slow = ckptstore.Checkpointer(FaultyBackend(LocalBackend(root), delay_s=0.05))
    try:
        slow.save_async(state(), 5)
        slow.save_async(state(), 5)
    finally:
        slow.close()


def load_into(target: dict[str, Any], **options: Any) -> Callable[[str], Any]:
    def call(root: str) -> Any:
        with ckptstore.Checkpointer(root) as ckpt:
            ckpt.save(state(), 1)
            return ckpt.load(target, **options)

    return call


def oneshot_load_into(target: dict[str, Any]) -> Callable[[str], Any]:
    def call(root: str) -> Any:
        path = os.path.join(root, "one")
        ckptstore.save(state(), path)
        return ckptstore.load(target, path)

    return call


InvalidArg = ckptstore.InvalidArgumentError
InvalidType = ckptstore.InvalidArgumentTypeError
Unsupported = ckptstore.UnsupportedStateError
Incompatible = ckptstore.IncompatibleCheckpointError

MISUSE = [
    # id, call, raises, also a, message
    ("negative step", save_with(-1), InvalidArg, ValueError, "0.."),
    ("string step", save_with("5"), InvalidType, TypeError, "str '5'"),
    ("float step", save_with(5.0), InvalidType, TypeError, "float"),
    ("bool step", save_with(True), InvalidType, TypeError, "bool"),
    ("tensor step", save_with(torch.tensor(5)), InvalidType, TypeError, "Tensor"),
    ("absurd step", save_with(10**20), InvalidArg, ValueError, "0.."),
    (
        "absurd step, one-shot save",
        lambda root: ckptstore.save(state(), os.path.join(root, "x"), step=10**20),
        InvalidArg,
        ValueError,
        "0..",
    ),
    ("step already in flight", duplicate_in_flight, InvalidArg, ValueError, "already being"),
    ("root None", open_root(None), InvalidType, TypeError, "NoneType"),
    ("root empty", open_root(""), InvalidArg, ValueError, "path or URL"),
    (
        "unknown scheme",
        open_root("nosuchscheme://bucket/run"),
        InvalidArg,
        ValueError,
        "cannot open",
    ),
    (
        "unknown codec",
        lambda root: ckptstore.Checkpointer(root, codec="lz5"),
        InvalidArg,
        ValueError,
        "unknown codec",
    ),
    (
        "unknown codec in a config",
        lambda root: ckptstore.CheckpointerConfig(codec={"id": "lz5"}),
        InvalidArg,
        ValueError,
        "unknown codec",
    ),
    (
        "max_inflight=0",
        lambda root: ckptstore.CheckpointerConfig(max_inflight=0),
        InvalidArg,
        ValueError,
        "max_inflight",
    ),
    (
        "config and options",
        lambda root: ckptstore.Checkpointer(root, config=ckptstore.CheckpointerConfig(), threads=1),
        InvalidType,
        TypeError,
        "not both",
    ),
    (
        "manager config field",
        lambda root: ckptstore.ManagerConfig(best_mode="median"),
        InvalidArg,
        ValueError,
        "best_mode",
    ),
    (
        "backup config field",
        lambda root: ckptstore.BackupConfig(url="s3://b/r", max_queued=0),
        InvalidArg,
        ValueError,
        "max_queued",
    ),
    ("self-referential dict", save_state(self_referential()), Unsupported, TypeError, "itself"),
    (
        "keys that collide when flattened",
        save_state({"a.b": T.clone(), "a": {"b": T.clone()}}),
        Unsupported,
        TypeError,
        "'a.b'",
    ),
    (
        "mixed int/str keys",
        save_state({"w": T.clone(), 0: T.clone()}),
        Unsupported,
        TypeError,
        "mixes",
    ),
    (
        "mixed keys, nested",
        save_state({"opt": {"state": {0: T.clone(), "1": T.clone()}}}),
        Unsupported,
        TypeError,
        "['opt']['state']",
    ),
    (
        "loading into meta tensors",
        load_into({"w": torch.empty(6, device="meta"), "b": torch.ones(2)}),
        Unsupported,
        TypeError,
        "meta",
    ),
    (
        "fp32 into int64",
        load_into({"w": torch.zeros(6, dtype=torch.int64), "b": torch.ones(2)}),
        Incompatible,
        ValueError,
        "w: checkpoint torch.float32, target torch.int64",
    ),
    (
        "fp32 into fp16",
        load_into({"w": T.clone(), "b": torch.ones(2, dtype=torch.float16)}),
        Incompatible,
        ValueError,
        "b: checkpoint torch.float32, target torch.float16",
    ),
    (
        "fp32 into fp16, one-shot load",
        oneshot_load_into({"w": T.half(), "b": torch.ones(2)}),
        Incompatible,
        ValueError,
        "allow_cast=True",
    ),
]


@pytest.mark.parametrize(
    ("call", "raises", "builtin", "message"),
    [pytest.param(*row[1:], id=row[0]) for row in MISUSE],
)
def test_misuse_raises_a_ckptstore_error_that_is_the_builtin_it_means(
    root, call, raises, builtin, message
):
    with pytest.raises(raises) as info:
        call(root)
    assert isinstance(info.value, ckptstore.CkptStoreError)
    assert isinstance(info.value, builtin)
    assert message in str(info.value)


def test_a_wrong_type_is_still_a_value_error():
    """``pytest.raises(ValueError)`` written before the type leaf existed still passes."""
    from ckptstore.engine.arguments import check_step

    with pytest.raises(ValueError, match="non-negative int"):
        check_step("5")  # type: ignore[arg-type]


def test_a_state_passed_as_the_step_is_named_short_with_the_order_each_class_takes(root):
    """Checkpointer.save takes (state_dict, step) and CheckpointManager.save (step,
    state): swapped, the error printed the whole state's repr (tens of lines for one
    tensor of 1,000 values) and did not say why."""
    state = {"w": torch.zeros(100_000), "b": torch.ones(1000)}
    order = "Checkpointer.save takes (state_dict, step), CheckpointManager.save takes (step, state)"
    with (
        ckptstore.Checkpointer(root) as ckpt,
        pytest.raises(ValueError, match=r"dict with keys \['w', 'b'\] \(a state\?") as info,
    ):
        ckpt.save(1, state)  # type: ignore[arg-type]
    assert order in str(info.value) and len(str(info.value)) < 300, str(info.value)
    with (
        ckptstore.CheckpointManager(root) as mgr,
        pytest.raises(ValueError, match=r"dict with keys \['w', 'b'\] \(a state\?") as info,
    ):
        mgr.save(state, 1)  # type: ignore[arg-type]
    assert order in str(info.value) and len(str(info.value)) < 300, str(info.value)
    assert "tensor(" not in str(info.value), str(info.value)  # keys, not values


def test_a_module_or_numpy_step_says_what_to_pass_instead(root):
    model = torch.nn.Linear(2, 2)
    with ckptstore.Checkpointer(root) as ckpt:
        with pytest.raises(
            ckptstore.errors.UnsupportedStateError,
            match=r"got Linear: pass a dict of them, e\.g\. \{'model'",
        ):
            ckpt.save(model, 1)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"got Tensor tensor\(5\) \(pass int\(step\)\)"):
            ckpt.save({"w": torch.ones(2)}, torch.tensor(5))  # type: ignore[arg-type]
        for step in (torch.tensor(2.5), torch.ones(3)):  # int() would truncate, or fail
            with pytest.raises(ValueError, match="got Tensor") as info:
                ckpt.save({"w": torch.ones(2)}, step)  # type: ignore[arg-type]
            assert "int(step)" not in str(info.value)
    with ckptstore.CheckpointManager(root) as mgr, pytest.raises(ValueError, match="got int -1"):
        mgr.save(-1, {"w": torch.ones(2)})


@pytest.mark.parametrize("dtype", [torch.float16, torch.int64, torch.bfloat16])
def test_loading_into_another_dtype_casts_when_asked(root, dtype):
    with ckptstore.Checkpointer(root) as ckpt:
        ckpt.save(state(), 1)
        target = {"w": torch.zeros(6, dtype=dtype), "b": torch.zeros(2)}
        ckpt.load(target, allow_cast=True)
    assert target["w"].dtype == dtype
    assert torch.equal(target["w"], T.to(dtype))
    assert torch.equal(target["b"], torch.ones(2))


@pytest.mark.parametrize(
    ("stored", "target"),
    [
        (torch.float32, torch.float64),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.int32, torch.int64),
        (torch.bool, torch.float32),
    ],
)
def test_a_widening_converts_without_asking(root, stored, target):
    src = {"w": torch.arange(6).to(stored)}
    with ckptstore.Checkpointer(root) as ckpt:
        ckpt.save(src, 1)
        dst = {"w": torch.zeros(6, dtype=target)}
        ckpt.load(dst)
    assert torch.equal(dst["w"], src["w"].to(target))


@pytest.mark.parametrize(
    ("stored", "target"),
    [(torch.int64, torch.float64), (torch.int32, torch.float32), (torch.uint8, torch.int8)],
)
def test_conversions_that_can_lose_values_need_allow_cast(root, stored, target):
    with ckptstore.Checkpointer(root) as ckpt:
        ckpt.save({"w": torch.arange(6).to(stored)}, 1)
        with pytest.raises(ckptstore.IncompatibleCheckpointError, match="w: checkpoint"):
            ckpt.load({"w": torch.zeros(6, dtype=target)})
