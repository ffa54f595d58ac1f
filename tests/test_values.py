"""Non-tensor values: a plain value the same as at the last save is not serialized
again (engine.values), and anything that differs, however slightly, is."""

from __future__ import annotations

import collections
import copy
import io
import math
import struct

import pytest
import torch

import ckptstore
from ckptstore.engine import values as values_mod
from ckptstore.engine.values import ValueCache, plain_key
from ckptstore.errors import UnsupportedStateError


def loaded(sv):
    return torch.load(io.BytesIO(sv.data), weights_only=True)


def test_the_same_plain_value_is_serialized_once(monkeypatch):
    calls = []
    real = values_mod.serialize
    monkeypatch.setattr(values_mod, "serialize", lambda f, v: calls.append(f) or real(f, v))
    cache = ValueCache()
    group = {"lr": 0.1, "betas": (0.9, 0.999), "params": [0, 1, 2], "foreach": None}
    first = cache.serialize_all({"optim.param_groups.0": group, "epoch": 3})
    second = cache.serialize_all({"optim.param_groups.0": group, "epoch": 3})
    assert calls == ["optim.param_groups.0", "epoch"]
    assert second["epoch"] is first["epoch"] and loaded(second["epoch"]) == 3
    group["lr"] = 0.05  # changed in place: the kept pickle is of the old value
    third = cache.serialize_all({"optim.param_groups.0": group, "epoch": 3})
    assert calls[-1] == "optim.param_groups.0" and loaded(third["optim.param_groups.0"]) == group


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (1, 1.0),
        (1, True),
        (0.0, -0.0),
        ((1, 2), [1, 2]),
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
        ("x", b"x"),
        (float("nan"), struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000001))[0]),
    ],
)
def test_values_equal_to_python_but_not_byte_for_byte_are_serialized_again(before, after):
    cache = ValueCache()
    cache.serialize_all({"v": before})
    got = cache.serialize_all({"v": after})["v"]
    assert got.data == values_mod.serialize("v", after).data
    back = loaded(got)
    assert type(back) is type(after)
    if isinstance(after, float) and math.isnan(after):
        assert struct.pack("<d", back) == struct.pack("<d", after)
    else:
        assert back == after
        if isinstance(after, dict):
            assert list(back) == list(after)  # the order too


def test_shared_structure_is_part_of_the_value():
    inner = [1, 2]
    shared, separate = [inner, inner], [inner, copy.copy(inner)]
    assert plain_key(shared) != plain_key(separate)
    cache = ValueCache()
    cache.serialize_all({"v": shared})
    assert (
        cache.serialize_all({"v": separate})["v"].data == values_mod.serialize("v", separate).data
    )


def test_what_is_not_plain_is_serialized_every_time_and_still_checked(monkeypatch):
    class Custom:
        pass

    assert plain_key(collections.OrderedDict(a=1)) is None
    assert plain_key(Custom()) is None
    assert plain_key(torch.tensor(1)) is None
    looped: list = []
    looped.append(looped)
    assert plain_key(looped) is None  # walked until the bound, never cached
    assert plain_key(list(range(10_000))) is None  # too large to keep
    cache = ValueCache()
    for _ in range(2):
        with pytest.raises(UnsupportedStateError, match="'custom'"):
            cache.serialize_all({"custom": Custom()})
    calls = []
    real = values_mod.serialize
    monkeypatch.setattr(values_mod, "serialize", lambda f, v: calls.append(f) or real(f, v))
    od = collections.OrderedDict(a=1)
    cache.serialize_all({"od": od})
    cache.serialize_all({"od": od})
    assert calls == ["od", "od"]


def test_only_the_last_states_keys_are_kept():
    cache = ValueCache()
    cache.serialize_all({"a": 1, "b": 2})
    cache.serialize_all({"b": 2})
    assert set(cache._kept) == {"b"}


def test_a_learning_rate_changed_between_saves_is_restored(root):
    """End to end: the scheduler changes a param group in place between two saves."""
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    with ckptstore.Checkpointer(root) as ckpt:
        ckpt.save({"optim": opt.state_dict()}, step=1)
        opt.param_groups[0]["lr"] = 0.05
        ckpt.save({"optim": opt.state_dict()}, step=2)
        for step, lr in ((1, 0.1), (2, 0.05)):
            fresh = torch.optim.AdamW(torch.nn.Linear(4, 4).parameters(), lr=1.0)
            target = {"optim": fresh.state_dict()}
            ckpt.load(target, step=step)
            assert target["optim"]["param_groups"][0]["lr"] == lr


def test_a_value_nested_deeper_than_pickle_goes_is_refused_naming_its_key(root):
    """Review D1: the cache's pickle must not turn torch.save's refusal, which names the
    key, into a bare RecursionError."""
    deep: object = 0
    for _ in range(900):
        deep = [deep]
    assert plain_key(deep) is None
    with pytest.raises(UnsupportedStateError, match="'k'"):
        ValueCache().serialize_all({"k": deep})


def test_a_large_string_is_not_pickled_for_the_cache(monkeypatch):
    """A value whose strings alone pass the size bound is given up while walking it."""
    import pickle

    calls = []
    monkeypatch.setattr(pickle, "dumps", lambda *a, **k: calls.append(1) or b"")
    assert plain_key(["x" * (300 << 10)]) is None and plain_key([b"y" * (300 << 10)]) is None
    assert not calls
