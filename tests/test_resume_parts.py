"""Issue 16, resume completeness: each rank's ``extras`` come back to that rank (real
gloo processes), generator objects in ``extras`` resume where they were, an empty part
(a disabled GradScaler) round-trips without a warning, and checkpoints written before
extras were kept per rank still load."""

from __future__ import annotations

import logging
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import REPO
from test_distributed import spawn_ranks

from ckptstore import Checkpointer, CheckpointManager, IncompatibleCheckpointError, TrainState


def next_values(results) -> dict[int, str]:
    """``rank -> "np py"``: what each rank's generators draw next, as printed."""
    out = {}
    for rc, text in results:
        assert rc == 0, text[-3000:]
        m = re.search(r"^NEXT (\d+) (\S+) (\S+)$", text, re.M)
        assert m, text[-3000:]
        out[int(m.group(1))] = f"{m.group(2)} {m.group(3)}"
    return out


@pytest.mark.parametrize(("saved", "loaded"), [(2, 2), (2, 1), (1, 2)])
def test_each_rank_gets_its_own_extras_back(tmp_path, saved, loaded):
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "saved_world").write_text(str(saved))
    before = next_values(spawn_ranks("extras_save", str(tmp_path), saved))
    after = next_values(spawn_ranks("extras_load", str(tmp_path), loaded))
    for rank, drawn in after.items():  # the generators go on exactly where they were
        assert drawn == before[rank], (rank, drawn, before)


def test_generators_in_extras_resume_in_place(tmp_path):
    np_gen, py_gen = np.random.default_rng(5), random.Random(5)
    np_gen.random(3), py_gen.random()
    state = TrainState(
        extras={"np": np_gen, "py": py_gen, "mt": np.random.Generator(np.random.MT19937(1))}
    )
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(0, state)
        mgr.wait()
    want = (np_gen.random(), py_gen.random(), state.extras["mt"].random())
    np_new, py_new = np.random.default_rng(0), random.Random(0)
    fresh = TrainState(extras={"np": np_new, "py": py_new})
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.restore(fresh) == 1
    assert fresh.extras["np"] is np_new and fresh.extras["py"] is py_new
    got = (np_new.random(), py_new.random(), fresh.extras["mt"].random())
    assert got == want


def test_a_disabled_grad_scaler_resumes_without_a_warning(tmp_path, caplog):
    model = torch.nn.Linear(2, 2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert scaler.state_dict() == {}
    state = TrainState(model=model, scaler=scaler)
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(0, state)
        mgr.wait()
    caplog.set_level(logging.WARNING, logger="ckptstore")
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.restore(TrainState(model=torch.nn.Linear(2, 2), scaler=scaler)) == 1
    assert "has no" not in caplog.text


def test_extras_of_a_checkpoint_from_before_per_rank_extras_load(tmp_path):
    """Written as TrainState did before: ``extras`` at the top of the state."""
    old = {
        "counters": {"step": 3, "epoch": 0, "best": {}},
        "extras": {"tokens": 7, "ema": torch.ones(2)},
    }
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(old, 3)
    fresh = TrainState(extras={"tokens": 0})
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.restore(fresh) == 3
    assert fresh.extras["tokens"] == 7 and torch.equal(fresh.extras["ema"], torch.ones(2))


SCRIPT = """
import logging, sys, torch, ckptstore
if sys.argv[2] == "configured":
    logging.basicConfig(level=logging.WARNING)
st = ckptstore.TrainState(model=torch.nn.Linear(2, 2))
with ckptstore.CheckpointManager(sys.argv[1], save=ckptstore.SaveEvery(steps=1)) as mgr:
    mgr.restore(st)
    mgr.maybe_save(0, st)
"""


@pytest.mark.parametrize("how", ["default", "quiet", "configured"])
def test_save_lines_are_visible_unless_silenced_or_logging_is_configured(tmp_path, how):
    env = dict(os.environ, PYTHONPATH=REPO)
    if how == "quiet":
        env["CKPTSTORE_QUIET"] = "1"
    for run in ("first", "resumed"):
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(tmp_path / "r"), how],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=True,
        )
        line = "step_00000001 committed" if run == "first" else "resumed from step_00000001"
        assert (line in out.stderr) == (how == "default"), out.stderr


def test_restore_takes_allow_partial_and_allow_cast(tmp_path):
    """The error's suggested fixes are accepted by CheckpointManager.restore itself."""
    small = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with CheckpointManager(tmp_path / "a") as mgr:
        mgr.save(0, TrainState(model=small))
        mgr.wait()
    grown = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 3))
    with CheckpointManager(tmp_path / "a") as mgr:
        with pytest.raises(IncompatibleCheckpointError, match="allow_partial"):
            mgr.restore(TrainState(model=grown))
        assert mgr.restore(TrainState(model=grown), allow_partial=True) == 1
    assert torch.equal(grown[0].weight, small[0].weight)
    half = {"x": torch.zeros(3, dtype=torch.float16)}
    with CheckpointManager(tmp_path / "b") as mgr:
        mgr.save(0, {"x": torch.tensor([1.0, 2.0, 3.1])})
        mgr.wait()
        with pytest.raises(IncompatibleCheckpointError, match="dtype"):
            mgr.restore(half)
        assert mgr.restore(half, allow_cast=True) == 1
    assert half["x"].dtype == torch.float16 and half["x"][2] == torch.tensor(3.1).half()


def test_a_rank_the_saved_run_did_not_have_gets_derived_generators(tmp_path, monkeypatch):
    """Resuming on more ranks: rank 3 of a run saved by one rank gets generators seeded
    from rank 0's saved state and its rank: the same on every resume, not rank 0's."""
    from ckptstore.integrations import trainstate

    model = torch.nn.Linear(2, 2)
    torch.manual_seed(1)
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(0, TrainState(model=model))
        mgr.wait()
    rank0_next = torch.rand(3)  # what rank 0's restored generator draws first
    monkeypatch.setattr(trainstate, "_rank", lambda: 3)
    draws = []
    for _ in range(2):
        torch.manual_seed(99)
        with CheckpointManager(tmp_path) as mgr:
            assert mgr.restore(TrainState(model=model)) == 1
        draws.append((torch.rand(3), random.random(), np.random.random()))
    assert torch.equal(draws[0][0], draws[1][0]) and draws[0][1:] == draws[1][1:]
    assert not torch.equal(draws[0][0], rank0_next)
    torch.manual_seed(99)
    assert not torch.equal(draws[0][0], torch.rand(3))  # set by the restore, not left alone
