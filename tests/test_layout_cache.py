"""The staging layout is planned once and reused while the state keeps it: a state that
changes between saves (a dtype, a shape, a key, ties, a value that becomes a container)
is planned again and saved bit-exactly; checks still fire after a cached save; Stateful
entries are still asked for their state_dict every save."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import assert_same, blank_like
from torch.distributed.checkpoint.stateful import Stateful

import ckptstore
from ckptstore.engine.layout_cache import is_stateful, resolve_stateful
from ckptstore.engine.stager import StagingPool


def base() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {f"l{i}.w": torch.randn(3 + i, generator=g) for i in range(6)},
        "opt": {"state": {"0": {"m": torch.randn(4, generator=g), "step": 3}}, "lr": 0.1},
        "buf": [torch.arange(5), torch.ones(2, 2)],
        "meta": (1, "x"),
    }


def _dtype(s: dict[str, Any]) -> None:
    s["model"]["l2.w"] = s["model"]["l2.w"].double()


def _shape(s: dict[str, Any]) -> None:
    s["model"]["l3.w"] = torch.randn(7)


def _rename(s: dict[str, Any]) -> None:
    s["model"]["renamed"] = s["model"].pop("l0.w")


def _add(s: dict[str, Any]) -> None:
    s["model"]["extra"] = torch.full((3,), 7.0)


def _remove(s: dict[str, Any]) -> None:
    del s["opt"]["state"]["0"]["m"]


def _reorder(s: dict[str, Any]) -> None:
    s["model"] = dict(reversed(s["model"].items()))


def _key_renamed(s: dict[str, Any]) -> None:
    s["opt"]["state"] = {"1": s["opt"]["state"]["0"]}


def _value_to_tensor(s: dict[str, Any]) -> None:
    s["opt"]["lr"] = torch.tensor(0.1)


def _tensor_to_value(s: dict[str, Any]) -> None:
    s["buf"][1] = 5


def _tensor_to_dict(s: dict[str, Any]) -> None:
    s["model"]["l1.w"] = {"a": torch.ones(1), "b": torch.zeros(2)}


def _list_longer(s: dict[str, Any]) -> None:
    s["buf"].append(torch.zeros(3))


def _value_list_gets_tensor(s: dict[str, Any]) -> None:
    s["meta"] = [1, torch.ones(2)]


def _tie(s: dict[str, Any]) -> None:
    s["model"]["l5.w"] = torch.randn(8)
    s["model"]["l4.w"] = s["model"]["l5.w"][:7]  # same start, another shape: not tied


def _transpose(s: dict[str, Any]) -> None:
    s["buf"][1] = torch.randn(2, 2).t()  # same shape, not contiguous


def _bf16(s: dict[str, Any]) -> None:
    s["model"] = {k: v.bfloat16() for k, v in s["model"].items()}


CHANGES: list[Callable[[dict[str, Any]], None]] = [
    _dtype,
    _shape,
    _rename,
    _add,
    _remove,
    _reorder,
    _key_renamed,
    _value_to_tensor,
    _tensor_to_value,
    _tensor_to_dict,
    _list_longer,
    _value_list_gets_tensor,
    _tie,
    _transpose,
    _bf16,
]


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.strip("_"))
def test_a_changed_layout_is_planned_again_and_saved_bit_exact(root, change):
    first = base()
    second = base()
    change(second)
    with ckptstore.Checkpointer(root, codec="none") as ckpt:
        ckpt.save(first, 1)
        ckpt.save(first, 2)  # the cached layout
        second_before = copy.deepcopy(second)
        ckpt.save(second, 3)  # changed: planned again
        for t in (v for v in second["model"].values() if isinstance(v, torch.Tensor)):
            t.add_(1)  # after staging: must not reach step 3
        second_after = copy.deepcopy(second)
        ckpt.save(second, 4)  # the new layout, cached
        ckpt.save(first, 5)  # and back
        for step, want in [(2, first), (3, second_before), (4, second_after), (5, first)]:
            target = blank_like(want)
            ckpt.load(target, step)
            assert_same(want, target)


def test_the_same_layout_reuses_the_plan_and_stages_new_data():
    pool = StagingPool(pin_memory=False)
    state = base()
    prep = pool.prepare(state)
    first = pool.copy(prep)
    ptr = first.flat["model.l0.w"].data_ptr()
    pool.release(first)
    same_layout = copy.deepcopy(state)  # new tensor objects, new data pointers
    same_layout["model"]["l0.w"].fill_(3.0)
    again = pool.prepare(same_layout)
    assert again.layout.signature is prep.layout.signature  # not planned again
    staged = pool.copy(again)
    assert torch.equal(staged.flat["model.l0.w"], torch.full((3,), 3.0))
    assert staged.flat["model.l0.w"].data_ptr() == ptr  # the same arena
    pool.release(staged)
    pool.close()


def test_tied_tensors_that_come_apart_are_both_saved(root):
    w = torch.randn(6)
    with ckptstore.Checkpointer(root, codec="none") as ckpt:
        ckpt.save({"a": w, "b": w}, 1)
        ckpt.save({"a": w, "b": w}, 2)
        apart = {"a": w, "b": w.clone().mul_(2)}
        ckpt.save(apart, 3)
        target = blank_like(apart)
        ckpt.load(target, 3)
    assert_same(apart, target)


def test_a_conjugate_or_negative_view_is_not_tied_to_the_tensor_it_views(root):
    """``c.conj()`` and ``c.conj().imag`` share ``c``'s bytes but not its values: each
    is saved with its own values, by a fresh plan and by a reused one that had them tied."""
    c = torch.complex(torch.randn(5), torch.randn(5))

    def check(ckpt: ckptstore.Checkpointer, state: dict[str, torch.Tensor], step: int) -> None:
        ckpt.save(state, step)
        values = {k: v.resolve_conj().resolve_neg().clone() for k, v in state.items()}
        target = {k: torch.zeros_like(v) for k, v in values.items()}
        ckpt.load(target, step)
        assert_same(values, target)

    with ckptstore.Checkpointer(root, codec="none") as ckpt:
        check(ckpt, {"c": c, "cc": c}, 1)  # tied: the plan the next save reuses
        check(ckpt, {"c": c, "cc": c.conj()}, 2)  # same address, dtype, shape, strides
        views = {"c": c, "cc": c.conj(), "im": c.imag, "nim": c.conj().imag}
        assert views["cc"].is_conj() and views["nim"].is_neg()
        check(ckpt, views, 3)  # a fresh plan
        check(ckpt, views, 4)  # the same again


def test_tensors_that_become_tied_are_both_saved(root):
    w = torch.randn(6)
    with ckptstore.Checkpointer(root, codec="none") as ckpt:
        ckpt.save({"a": w, "b": torch.zeros(6)}, 1)
        ckpt.save({"a": w, "b": torch.zeros(6)}, 2)
        tied = {"a": w, "b": w}
        ckpt.save(tied, 3)
        expected = w.clone()
        w.add_(1)  # after the save: not in it
        target = blank_like(tied)
        ckpt.load(target, 3)
    assert torch.equal(target["a"], expected) and torch.equal(target["b"], expected)


class Counter:
    """A Stateful: its state_dict() is asked for on every save."""

    def __init__(self) -> None:
        self.calls = 0
        self.w = torch.zeros(3)

    def state_dict(self) -> dict[str, Any]:
        self.calls += 1
        self.w.fill_(self.calls)
        return {"w": self.w, "calls": self.calls}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.w.copy_(sd["w"])
        self.calls = sd["calls"]


def test_a_stateful_entry_is_asked_every_save(root):
    c = Counter()
    model = torch.nn.Linear(3, 2)
    with ckptstore.Checkpointer(root, codec="none") as ckpt:
        for step in (1, 2, 3):
            ckpt.save({"c": c, "model": model, "x": torch.ones(2)}, step)
        assert c.calls == 3
        back = Counter()
        target = {"c": back, "model": torch.nn.Linear(3, 2), "x": torch.zeros(2)}
        ckpt.load(target, 2)
    assert back.calls == 2
    assert torch.equal(back.w, torch.full((3,), 2.0))
    assert torch.equal(target["model"].weight, model.weight)


class Registered:
    pass


Stateful.register(Registered)  # type: ignore[attr-defined]


class HalfStateful:
    def state_dict(self) -> dict[str, Any]:
        return {}


class NoneStateful(Counter):
    state_dict = None  # type: ignore[assignment]


def _tensor_with_methods() -> torch.Tensor:
    t = torch.ones(2)
    t.state_dict = lambda: {}  # type: ignore[attr-defined]
    t.load_state_dict = lambda sd: None  # type: ignore[attr-defined]
    return t


@pytest.mark.parametrize(
    "obj",
    [
        torch.ones(2),
        torch.nn.Parameter(torch.ones(2)),
        _tensor_with_methods(),
        {"a": 1},
        [1],
        (1,),
        1,
        "s",
        None,
        torch.nn.Linear(2, 2),
        Counter(),
        Registered(),
        HalfStateful(),
        NoneStateful(),
    ],
    # (not repr: object addresses differ between pytest-xdist's workers)
    ids=["tensor", "parameter", "tensor-with-state-dict-methods", "dict", "list", "tuple",
         "int", "str", "None", "module", "Counter", "Registered", "HalfStateful",
         "NoneStateful"],
)  # fmt: skip
def test_is_stateful_answers_like_the_protocol(obj):
    assert is_stateful(obj) is isinstance(obj, Stateful)
    assert is_stateful(obj) is isinstance(obj, Stateful)  # answered from the type cache


def test_resolve_stateful_is_dcps_shallow_copy():
    c = Counter()
    sd = {"c": c, "t": torch.ones(1), 3: "x"}
    out = resolve_stateful(sd)
    assert out is not sd
    assert list(out) == ["c", "t", 3]
    assert out["c"] == {"w": c.w, "calls": 1}
    assert out["t"] is sd["t"]


def _self_referential(s: dict[str, Any]) -> None:
    s["opt"]["loop"] = s


def _mixed_keys(s: dict[str, Any]) -> None:
    s["opt"]["state"][1] = {"m": torch.ones(1)}


def _colliding(s: dict[str, Any]) -> None:
    s["model.l0.w"] = torch.ones(3)


def _meta(s: dict[str, Any]) -> None:
    s["model"]["l0.w"] = torch.empty(3, device="meta")


def _sparse(s: dict[str, Any]) -> None:
    s["buf"][1] = torch.ones(2, 2).to_sparse()


def _value_cycle(s: dict[str, Any]) -> None:
    s["meta"] = (1, s)


class Plain:
    pass


def _not_loadable(s: dict[str, Any]) -> None:
    s["opt"]["lr"] = Plain()


BAD = [
    (_self_referential, "itself"),
    (_mixed_keys, "mixes"),
    (_colliding, "'model.l0.w'"),
    (_meta, "meta"),
    (_sparse, "layout"),
    (_value_cycle, "itself"),
    (_not_loadable, "weights_only"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=lambda x: getattr(x, "__name__", ""))
def test_checks_still_fire_after_a_cached_save(root, change, message):
    state = base()
    with ckptstore.Checkpointer(root, codec="none") as ckpt:
        ckpt.save(state, 1)
        ckpt.save(state, 2)
        bad = base()
        change(bad)
        with pytest.raises(ckptstore.UnsupportedStateError, match=message):
            ckpt.save(bad, 3)
        ckpt.save(state, 4)
        assert [c.step for c in ckpt.list()] == [1, 2, 4]
