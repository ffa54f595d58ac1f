"""Issue 16, Accelerate: the real ``accelerate`` package (the ``integrations`` extra),
driving ``examples/accelerate_example.py`` as a user would: an interrupted run
(SIGTERM) and its rerun end bit-identical to an uninterrupted run, in 1 process and in
2 gloo processes under torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("accelerate")

from helpers import REPO

EXAMPLE = os.path.join(REPO, "examples", "accelerate_example.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(tmp_path, procs: int, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    launch = [sys.executable]
    if procs > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(procs)]
        launch += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return subprocess.run(
        [*launch, EXAMPLE, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )


@pytest.mark.parametrize("procs", [1, 2])
def test_an_interrupted_accelerate_run_resumes_bit_identical(tmp_path, procs):
    steps = ["--steps", "20", "--save-every", "5"]
    whole = run(tmp_path, procs, "--ckpt-dir", "a", *steps, "--out", "a.pt")
    assert whole.returncode == 0, whole.stderr[-3000:]
    stopped = run(tmp_path, procs, "--ckpt-dir", "b", *steps, "--stop-after", "8")
    assert stopped.returncode != 0 and "SIGTERM" in stopped.stderr, stopped.stderr[-3000:]
    rerun = run(tmp_path, procs, "--ckpt-dir", "b", *steps, "--out", "b.pt")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from step_" in rerun.stderr
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


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
