"""Bit-exact round trips of realistic states, through both APIs and both codecs."""

from __future__ import annotations

import os
import random

import pytest
import torch
from helpers import assert_same, blank_like, every_dtype, realistic_state, train_gpt

import ckptstore
from ckptstore.train.model import GPT, MODEL_SIZES

CODECS = ["none", "zstd", {"id": "zstd", "level": 5}]


@pytest.mark.parametrize("codec", CODECS, ids=["none", "zstd", "zstd5"])
def test_sync_roundtrip_realistic_state(tmp_path, codec):
    state = realistic_state()
    info = ckptstore.save(state, tmp_path / "ck", step=7, codec=codec, metadata={"note": "hi"})
    assert info.step == 7
    assert info.metadata == {"note": "hi"}
    assert info.raw_bytes > 0
    target = blank_like(state)
    with pytest.raises(AssertionError):
        assert_same(state, target)  # the target really starts out different
    ckptstore.load(target, tmp_path / "ck")
    assert_same(state, target)


def test_assert_same_sees_one_flipped_bit():
    a = {"w": torch.randn(100), "v": [1, "x"]}
    b = {"w": a["w"].clone(), "v": [1, "x"]}
    assert_same(a, b)
    b["w"].view(torch.int32)[57] ^= 1
    with pytest.raises(AssertionError, match="bytes differ"):
        assert_same(a, b)
    with pytest.raises(AssertionError):
        assert_same({"v": 1}, {"v": 1.0})


@pytest.mark.parametrize("codec", CODECS, ids=["none", "zstd", "zstd5"])
def test_checkpointer_roundtrip_every_dtype_small_chunks(root, codec):
    state = {"t": every_dtype(), "v": {"x": 1}}
    # 64 KiB chunks: the 1.2 MB tensor spans many chunks, odd tails included.
    with ckptstore.Checkpointer(root, codec=codec, chunk_bytes=64 * 1024) as ckpt:
        result = ckpt.save(state, 3)
        assert result.codec == (codec if isinstance(codec, str) else "zstd")
        target = blank_like(state)
        ckpt.load(target)
    assert_same(state, target)


def test_compressed_checkpoint_is_smaller(root):
    model, opt, _ = train_gpt("small")
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    with ckptstore.Checkpointer(root, codec="zstd") as ckpt:
        result = ckpt.save(state, 1)
    assert 0.5 < result.ratio < 0.95, result.ratio


def test_resume_continues_training_bit_exact(root):
    """Save at step k, restore into fresh objects in place, keep training: identical."""
    cfg = MODEL_SIZES["tiny"]

    def batch(i):
        g = torch.Generator().manual_seed(1000 + i)
        return torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=g)

    def make():
        torch.manual_seed(0)
        m = GPT(cfg)
        o = torch.optim.AdamW(m.parameters(), lr=1e-3)
        return m, o

    def train(m, o, steps):
        losses = []
        for i in steps:
            _, loss = m(batch(i), batch(i))
            o.zero_grad()
            loss.backward()
            o.step()
            losses.append(loss.item())
        return losses

    m, o = make()
    full = train(m, o, range(6))
    final = {k: v.clone() for k, v in m.state_dict().items()}

    m, o = make()
    first = train(m, o, range(3))
    with ckptstore.Checkpointer(root) as ckpt:
        ckpt.save({"model": m, "optim": o}, 3)  # Stateful objects, as with dcp.save
        m2, o2 = make()
        _, loss = m2(batch(0), batch(0))  # give the fresh optimizer its state tensors
        loss.backward()
        o2.step()
        ckpt.load({"model": m2, "optim": o2})
    rest = train(m2, o2, range(3, 6))
    assert first + rest == full
    assert_same(final, dict(m2.state_dict()))


def test_rng_states_roundtrip(root):
    torch.manual_seed(3)
    random.seed(3)
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    expected_next = (torch.rand(3), random.random())
    with ckptstore.Checkpointer(root) as ckpt:
        ckpt.save(state, 0)
        torch.manual_seed(99)
        random.seed(99)
        target = {"torch": torch.empty_like(state["torch"]), "python": None}
        ckpt.load(target)
    torch.set_rng_state(target["torch"])
    random.setstate(target["python"])
    assert torch.equal(torch.rand(3), expected_next[0])
    assert random.random() == expected_next[1]


def test_tied_weights_and_views_roundtrip(root):
    cfg = MODEL_SIZES["tiny"]
    model = GPT(cfg)
    sd = model.state_dict()
    assert sd["wte.weight"].data_ptr() == sd["lm_head.weight"].data_ptr()  # tied
    with ckptstore.Checkpointer(root) as ckpt:
        ckpt.save({"model": sd}, 0)
        fresh = GPT(cfg)
        ckpt.load({"model": fresh})
    assert_same(dict(sd), dict(fresh.state_dict()))


def test_load_into_different_dtype_and_layout(root):
    """Targets need not match dtype or contiguity: values are converted like copy_()."""
    src = {"w": torch.randn(8, 6)}
    with ckptstore.Checkpointer(root, codec="zstd") as ckpt:
        ckpt.save(src, 0)
        as_double = {"w": torch.zeros(8, 6, dtype=torch.float64)}
        ckpt.load(as_double)
        transposed = {"w": torch.zeros(6, 8).t()}
        ckpt.load(transposed)
    assert torch.equal(as_double["w"], src["w"].double())
    assert torch.equal(transposed["w"], src["w"])


def test_load_by_step_and_list(root):
    with ckptstore.Checkpointer(root) as ckpt:
        for step in (5, 10, 15):
            ckpt.save({"x": torch.full((4,), float(step))}, step, metadata={"step_again": step})
        assert [i.step for i in ckpt.list()] == [5, 10, 15]
        assert [i.name for i in ckpt.list()] == ["step_00000005", "step_00000010", "step_00000015"]
        assert ckpt.latest().step == 15
        target = {"x": torch.zeros(4)}
        info = ckpt.load(target, 10)
        assert info.metadata == {"step_again": 10}
        assert torch.equal(target["x"], torch.full((4,), 10.0))
        ckpt.load(target)
        assert torch.equal(target["x"], torch.full((4,), 15.0))
    assert sorted(os.listdir(root)) == ["step_00000005", "step_00000010", "step_00000015"]


def test_memory_filesystem_roundtrip():
    """Nothing assumes POSIX paths: the same save/load over fsspec's memory://."""
    state = realistic_state()
    url = "memory://ckptstore-test/run"
    with ckptstore.Checkpointer(url, codec="zstd") as ckpt:
        ckpt.save(state, 1)
        target = blank_like(state)
        ckpt.load(target)
        assert [i.step for i in ckpt.list()] == [1]
    assert_same(state, target)
    info = ckptstore.save({"a": torch.ones(3)}, url + "/one-off")
    assert info.url == url + "/one-off"
    got = {"a": torch.zeros(3)}
    ckptstore.load(got, url + "/one-off")
    assert torch.equal(got["a"], torch.ones(3))


def test_loading_into_a_fresh_optimizer_is_refused_not_silently_skipped(root):
    """A new AdamW has no state until its first step; DCP would load nothing into it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt, _ = train_gpt("tiny")
    with ckptstore.Checkpointer(root) as ckpt:
        ckpt.save({"model": model, "optim": opt}, 1)
        fresh_model = GPT(MODEL_SIZES["tiny"])
        fresh_opt = torch.optim.AdamW(fresh_model.parameters(), lr=1e-3)
        with pytest.raises(ckptstore.IncompatibleCheckpointError, match="freshly built optimizer"):
            ckpt.load({"model": fresh_model, "optim": fresh_opt})
        ckpt.load({"model": fresh_model, "optim": fresh_opt}, allow_partial=True)  # explicit opt-in

        # Saving and loading through DCP's get/set_state_dict creates the state: it works.
        msd, osd = get_state_dict(model, opt)
        ckpt.save({"model": msd, "optim": osd}, 2)
        model2 = GPT(MODEL_SIZES["tiny"])
        opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
        msd2, osd2 = get_state_dict(model2, opt2)
        target = {"model": msd2, "optim": osd2}
        ckpt.load(target, 2)
        set_state_dict(
            model2, opt2, model_state_dict=target["model"], optim_state_dict=target["optim"]
        )
    for p1, p2 in zip(opt.state.values(), opt2.state.values(), strict=True):
        assert torch.equal(p1["exp_avg"], p2["exp_avg"])
        assert torch.equal(p1["exp_avg_sq"], p2["exp_avg_sq"])
