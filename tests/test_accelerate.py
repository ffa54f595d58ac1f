"""Issue 16, Accelerate: the real ``accelerate`` package (the ``integrations`` extra),
driving ``examples/accelerate_example.py`` as a user would: an interrupted run
(SIGTERM) and its rerun end bit-identical to an uninterrupted run, in 1 process and in
2 gloo processes under torchrun."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate")

from helpers import (
    assert_interrupted_run_resumes_identically,
    assert_two_process_run_resumes_in_one,
)


@pytest.mark.parametrize("procs", [1, 2])
def test_an_interrupted_accelerate_run_resumes_bit_identical(tmp_path, procs):
    assert_interrupted_run_resumes_identically(
        tmp_path,
        "accelerate_example.py",
        procs,
        ["--steps", "20", "--save-every", "5"],
        dir_flag="--ckpt-dir",
        out_flag="--out",
    )


def test_the_optimizer_inside_acceleratedoptimizer_is_what_is_saved(tmp_path):
    from accelerate import Accelerator

    from ckptstore import CheckpointManager
    from ckptstore.integrations.accelerate import accelerate_state

    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = acc.prepare(model, opt)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    state = accelerate_state(acc, model, opt)
    acc.step = 7
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(0, state)  # crashed with AttributeError before: hooks on the wrapper
        mgr.wait()
    acc.step = 0
    model.zero_grad(set_to_none=True)  # as in a new process: DCP then creates the state
    fresh_opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.restore(accelerate_state(acc, model, acc.prepare(fresh_opt))) == 1
    assert acc.step == 7
    assert torch.equal(
        fresh_opt.state_dict()["state"][0]["exp_avg"],
        opt.optimizer.state_dict()["state"][0]["exp_avg"],
    )


def test_a_two_process_run_resumes_in_one_process(tmp_path):
    """2 processes stopped by SIGTERM; the rerun in one process resumes from their
    checkpoint (rank 0's generators, the data position carried to one process) and
    finishes."""
    assert_two_process_run_resumes_in_one(
        tmp_path,
        "accelerate_example.py",
        ["--steps", "20", "--save-every", "5"],
        dir_flag="--ckpt-dir",
        out_flag="--out",
    )


def test_incremental_saves_of_an_accelerate_run_link_its_frozen_layer(tmp_path):
    from accelerate import Accelerator

    from ckptstore import CheckpointManager
    from ckptstore.integrations.accelerate import accelerate_state

    acc = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 4))
    model[0].requires_grad_(False)  # fine-tuning: a frozen base, 1 MB
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, opt = acc.prepare(model, opt)
    state = accelerate_state(acc, model, opt)
    with CheckpointManager(tmp_path, incremental=True, codec="none") as mgr:
        for step in range(3):
            model(torch.ones(2, 512)).sum().backward()
            opt.step()
            opt.zero_grad()
            mgr.save(step, state)
            mgr.wait()
        infos = mgr.checkpointer.list()
        saved = {k: v.clone() for k, v in model.state_dict().items()}
    assert [bool(i.manifest.linked) for i in infos] == [False, True, True]
    assert all(i.manifest.owned_bytes < 0.1 * infos[0].manifest.owned_bytes for i in infos[1:])
    fresh = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 4))
    fresh[0].requires_grad_(False)
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    fresh, fresh_opt = acc.prepare(fresh, fresh_opt)
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.restore(accelerate_state(acc, fresh, fresh_opt)) == 3
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved[k]), k
