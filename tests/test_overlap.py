"""Issue 15, zero stall by default: ``CheckpointManager`` copies a TrainState's tensors
on the writer thread while the loop goes on, and the saved state is exactly the state at
``maybe_save`` whatever the loop does next: ``optimizer.step()`` and the forward pass of
a BatchNorm wait for the copy; scheduler and Python values are serialized before
``maybe_save`` returns; an in-place edit nothing waits for is caught and that save is
abandoned, never written torn. The copy is slowed down (0.3 s) so that every mutation
lands while it runs."""

from __future__ import annotations

import copy
import logging
import time

import pytest
import torch
from helpers import assert_same

from ckptstore import CheckpointManager, ManagerConfig, SaveEvery, TrainState
from ckptstore.engine.stager import StagingPool

SLOW_S = 0.3


@pytest.fixture
def slow_copy(monkeypatch):
    original = StagingPool.copy

    def slow(self, prep):
        time.sleep(SLOW_S)
        return original(self, prep)

    monkeypatch.setattr(StagingPool, "copy", slow)


def make(bn: bool = False):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 64)]
    if bn:
        layers.append(torch.nn.BatchNorm1d(64))
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    return model, opt, sched, TrainState(model=model, optimizer=opt, scheduler=sched)


def step(model, opt, sched=None):
    model(torch.randn(8, 64)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    if sched is not None:
        sched.step()


def load_model(root, model_like, step_no: int) -> dict:
    import ckptstore

    return ckptstore.read(f"{root}/step_{step_no:08d}")


def test_the_save_returns_before_the_copy_and_optimizer_step_waits(tmp_path, slow_copy):
    model, opt, sched, state = make()
    step(model, opt, sched)
    with CheckpointManager(tmp_path, save=SaveEvery(steps=1)) as mgr:
        pending = mgr.maybe_save(0, state)
        # returned while the copy (SLOW_S at least) goes on: no wall-clock bound here,
        # which a loaded machine broke once (0.69 s to return, the copy still going)
        assert pending is not None and not pending.staged.done()
        want = copy.deepcopy(model.state_dict())
        want_sched = sched.state_dict()["last_epoch"]
        step(model, opt, sched)  # optimizer.step() waits; the scheduler changes at once
        assert state.copy_wait_s > 0
        mgr.wait()
    got = load_model(tmp_path, model, 1)
    assert_same(got["model"], want)
    assert got["scheduler"]["last_epoch"] == want_sched


def test_a_batchnorm_forward_waits_for_the_copy(tmp_path, slow_copy):
    model, opt, _sched, state = make(bn=True)
    step(model, opt)
    with CheckpointManager(tmp_path, save=SaveEvery(steps=1)) as mgr:
        mgr.maybe_save(0, state)
        want = copy.deepcopy(model.state_dict())
        model(torch.randn(8, 64))  # updates running_mean / running_var in place
        mgr.wait()
    got = load_model(tmp_path, model, 1)
    assert_same(got["model"], want)
    assert not torch.equal(want["1.running_mean"], model.state_dict()["1.running_mean"])


def test_an_edit_nothing_waits_for_abandons_that_save_and_later_saves_block(
    tmp_path, slow_copy, caplog
):
    model, opt, _sched, state = make()
    step(model, opt)
    caplog.set_level(logging.ERROR, logger="ckptstore")
    with CheckpointManager(tmp_path, save=SaveEvery(steps=1)) as mgr:
        pending = mgr.maybe_save(0, state)
        with torch.no_grad():
            model[0].weight.add_(1.0)  # in place, outside the optimizer: not waited for
        with pytest.raises(Exception, match="changed in place"):
            pending.wait()
        assert "abandoned" in caplog.text
        mgr.maybe_save(1, state)  # now copies before returning
        want = copy.deepcopy(model.state_dict())
        with torch.no_grad():
            model[0].weight.add_(1.0)
        mgr.wait()  # the abandoned save is not raised again
        steps = [c.step for c in mgr.list()]
    assert steps == [2]  # step 1 was never written torn
    assert_same(load_model(tmp_path, model, 2)["model"], want)


def test_two_saves_in_flight_each_keep_their_own_state(tmp_path, slow_copy):
    model, opt, sched, state = make()
    with CheckpointManager(tmp_path, config=ManagerConfig(save=SaveEvery(steps=1))) as mgr:
        wants = []
        for i in range(3):
            step(model, opt, sched)
            mgr.maybe_save(i, state)
            wants.append(copy.deepcopy(model.state_dict()))
        mgr.wait()
    for i, want in enumerate(wants, start=1):
        assert_same(load_model(tmp_path, model, i)["model"], want)


def test_the_switch_and_plain_dicts_copy_before_returning(tmp_path, slow_copy):
    _model, _opt, _sched, state = make()
    cfg = ManagerConfig(save=SaveEvery(steps=1), overlap_copy=False)
    with CheckpointManager(tmp_path / "off", config=cfg) as mgr:
        assert mgr.maybe_save(0, state).staged.done()
    with CheckpointManager(tmp_path / "dict", save=SaveEvery(steps=1)) as mgr:
        assert mgr.maybe_save(0, {"w": torch.ones(3)}).staged.done()
