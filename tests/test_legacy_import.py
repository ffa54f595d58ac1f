"""Issue 16, seed users' migration: a ``torch.save`` file in the layout training scripts
write (``model_state_dict``/``optimizer_state_dict``/``scheduler_state_dict``/``epoch``/
..., or nanoGPT's ``model``/``optimizer``/``iter_num``/``best_val_loss``/``config``)
goes through the real ``ckptstore import`` and then resumes a TrainState with
``CheckpointManager.restore``, every part where that script's own resume code put it.
A refused global is named."""

from __future__ import annotations

import argparse
import subprocess

import torch
from helpers import run_cli

from ckptstore import CheckpointManager, TrainState
from ckptstore.train.model import GPT, MODEL_SIZES


def trained(steps: int = 3):
    torch.manual_seed(0)
    model = GPT(MODEL_SIZES["tiny"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 5)
    x = torch.randint(0, 256, (2, 16))
    for _ in range(steps):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def fresh():
    model = GPT(MODEL_SIZES["tiny"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, 5)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args)


def same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa["state"][k][name], sb["state"][k][name]), (k, name)


def test_a_seed_style_file_imports_and_resumes_a_trainstate(tmp_path):
    model, opt, sched = trained()
    torch.save(
        {
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": opt.state_dict(),
            "scheduler_state_dict": sched.state_dict(),
            "epoch": 2,
            "global_step": 3,
            "best_val_loss": 1.5,
            "config": {"lr": 1e-3, "name": "seed"},
        },
        tmp_path / "checkpoint.pt",
    )
    out = cli("import", str(tmp_path / "checkpoint.pt"), str(tmp_path / "root"))
    assert out.returncode == 0, out.stderr
    assert "step_00000003" in out.stdout  # global_step, as --step was not given
    m2, o2, s2 = fresh()
    state = TrainState(model=m2, optimizer=o2, scheduler=s2)
    with CheckpointManager(tmp_path / "root") as mgr:
        assert mgr.restore(state) == 3
    for a, b in zip(model.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    same_optimizer(opt, o2)
    assert s2.last_epoch == 3 and state.epoch == 2 and state.best == {"val_loss": 1.5}


def test_a_nanogpt_checkpoint_imports_and_resumes(tmp_path):
    model, opt, _ = trained()
    compiled_keys = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save(
        {
            "model": compiled_keys,  # nanoGPT saves a torch.compile-d model's keys
            "optimizer": opt.state_dict(),
            "model_args": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32},
            "iter_num": 7,
            "best_val_loss": torch.tensor(2.25),
            "config": {"dataset": "shakespeare_char", "compile": True},
        },
        tmp_path / "ckpt.pt",
    )
    out = cli("import", str(tmp_path / "ckpt.pt"), str(tmp_path / "root"))
    assert out.returncode == 0, out.stderr
    m2, o2, _ = fresh()
    state = TrainState(model=m2, optimizer=o2)
    with CheckpointManager(tmp_path / "root") as mgr:
        assert mgr.restore(state) == 7
    for a, b in zip(model.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    same_optimizer(opt, o2)
    assert state.best == {"val_loss": 2.25}


def test_a_refused_global_is_named(tmp_path):
    torch.save({"args": argparse.Namespace(lr=0.1), "w": torch.ones(2)}, tmp_path / "ns.pt")
    out = cli("import", str(tmp_path / "ns.pt"), str(tmp_path / "root"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "argparse.Namespace is not an allowed type" in out.stderr
    assert not (tmp_path / "root" / "step_00000000").exists()


def test_an_exported_trainstate_imports_at_its_own_step(tmp_path):
    """`ckptstore export` of a TrainState checkpoint, imported again, keeps its step
    (counters.step; it was imported as step 0, and a run resuming it said it started
    from scratch); a checkpoint of step 0 counts as restored (mgr.restored)."""
    model, opt, sched = trained()
    state = TrainState(model=model, optimizer=opt, scheduler=sched)
    with CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(19, state)  # the checkpoint of 20 steps done
    exported = str(tmp_path / "m.pt")
    assert cli("export", str(tmp_path / "run"), exported).returncode == 0
    out = cli("import", exported, str(tmp_path / "imported"))
    assert out.returncode == 0, out.stderr
    assert "step_00000020" in out.stdout, out.stdout
    m2, o2, s2 = fresh()
    again = TrainState(model=m2, optimizer=o2, scheduler=s2)
    with CheckpointManager(tmp_path / "imported") as mgr:
        assert mgr.restore(again) == 20 and mgr.restored == "step_00000020"
    for a, b in zip(model.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert cli("import", exported, str(tmp_path / "zero"), "--step", "0").returncode == 0
    with CheckpointManager(tmp_path / "zero") as mgr:
        assert mgr.restore(TrainState(*fresh()[:2])) == 0
        assert mgr.restored == "step_00000000"
    with CheckpointManager(tmp_path / "empty") as mgr:
        assert mgr.restore(TrainState(*fresh()[:2])) == 0 and mgr.restored is None


def test_the_step_an_import_takes_from_the_file():
    from ckptstore.cli.import_ import step_in

    assert step_in({"iter_num": 7, "counters": {"step": 9}}) == 7
    assert step_in({"counters": {"step": 9}}) == 9  # a TrainState's
    assert step_in({}, {"ckptstore_step": "12"}) == 12  # an exported safetensors file's
    assert step_in({}, {"ckptstore_step": "\u00b2"}) == 0  # (isdigit() says yes; int() fails)
    assert step_in({"step": -1, "counters": "x"}, {"ckptstore_step": "no"}) == 0
