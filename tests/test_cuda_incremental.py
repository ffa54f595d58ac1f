"""Incremental saves (issue 19) of a state on a GPU. Each test runs on the CPU too, so
that what it checks is known to hold where it can run; the ``cuda`` runs are skipped,
with the reason, on a machine without a GPU (``benchmarks/gpu_check.sh`` runs them).

A GPU state takes another path than a CPU one: staging copies every tensor to the host
(nothing is hashed where it lies on the device, and ``trust_version_counters`` trusts
nothing there), the writer hashes the staged copy, and what is unchanged is linked.
These tests pin what a user sees on that path:

* fine-tuning (frozen weights, AdamW over adapters): the saves after the first link the
  frozen weights, and every checkpoint reloads bit-exact onto the GPU and onto the CPU;
* a change queued on the GPU just before a save is in it, and one made right after
  ``save_async`` returns is not (it is in the next one);
* a write behind the version counter (through ``.data``) is saved, not linked over;
* a restart that loads a checkpoint onto the GPU links its first save from it;
* the reference loop with ``--freeze-blocks --incremental`` stopped by SIGTERM and rerun
  ends as the run never stopped.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_train import assert_sigterm_then_rerun_equals_the_uninterrupted_run, run, train_cmd

import ckptstore
from ckptstore.errors import StateChangedError

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
WIDTH = 512  # each frozen layer: 1 MiB of float32


def device_of(name: str) -> torch.device:
    if name == "cuda":
        torch.cuda.set_device(0)
        return torch.device("cuda:0")
    return torch.device("cpu")


class Tuned(torch.nn.Module):
    """Frozen layers under a rank-4 adapter: ~96% of the state's bytes never change."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.base = torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH) for _ in range(6)))
        self.base.requires_grad_(False)
        self.down = torch.nn.Linear(WIDTH, 4, bias=False)
        self.up = torch.nn.Linear(4, WIDTH, bias=False)
        self.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


def train_step(model: Tuned, opt: torch.optim.Optimizer, device: torch.device, step: int) -> None:
    g = torch.Generator(device=device).manual_seed(step)
    x = torch.randn(8, WIDTH, device=device, generator=g)
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def snapshot(state: dict) -> dict:
    """Every tensor of ``state`` (nested), cloned onto the CPU; the rest as it is."""
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().cpu().clone()
        elif isinstance(v, dict):
            out[k] = snapshot(v)
        else:
            out[k] = v
    return out


def assert_same(want: dict, got: dict, path: str = "") -> None:
    assert set(want) == set(got), path
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            g = got[k].detach().cpu()
            assert g.dtype == v.dtype and g.shape == v.shape, f"{path}{k}"
            assert torch.equal(as_bytes(g), as_bytes(v)), f"{path}{k}: bytes differ"
        elif isinstance(v, dict):
            assert_same(v, got[k], f"{path}{k}.")
        else:
            assert v == got[k], f"{path}{k}"


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return (
        t.contiguous().reshape(-1).view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)
    )


def frozen_bytes(model: Tuned) -> int:
    return sum(p.numel() * p.element_size() for p in model.base.parameters())


def fresh(device: torch.device) -> tuple[Tuned, torch.optim.Optimizer]:
    model = Tuned(device)
    opt = torch.optim.AdamW([*model.down.parameters(), *model.up.parameters()], lr=1e-2)
    return model, opt


@pytest.mark.parametrize("device_name", DEVICES)
def test_fine_tuning_links_the_frozen_weights_and_reloads_bit_exact(root, device_name):
    device = device_of(device_name)
    model, opt = fresh(device)
    saved, results = {}, []
    with ckptstore.Checkpointer(root, codec="none", incremental=True, full_every=0) as ckpt:
        for step in range(1, 5):
            train_step(model, opt, device, step)
            state = {"model": model.state_dict(), "optim": opt.state_dict()}
            saved[step] = snapshot(state)
            results.append(ckpt.save(state, step=step))
        full = results[0].stored_bytes
        for step, r in enumerate(results[1:], start=2):
            # the adapters, their AdamW moments and the step counters: ~3% of the state
            assert r.stored_bytes < 0.1 * full, (step, r.stored_bytes, full)
            manifest = ckpt.list()[step - 1].manifest
            assert manifest.linked, f"step {step} linked nothing"
            assert manifest.owned_bytes < 0.1 * full, (step, manifest.owned_bytes)
        assert frozen_bytes(model) > 0.9 * full
        for step in range(1, 5):
            assert ckpt.verify(step) == []
            for onto in (device, torch.device("cpu")):
                other, other_opt = fresh(onto)
                train_step(other, other_opt, onto, 99)  # so that the optimizer has state
                target = {"model": other.state_dict(), "optim": other_opt.state_dict()}
                ckpt.load(target, step)
                assert_same(saved[step], snapshot(target), f"step {step} onto {onto}: ")


def keep_busy(device: torch.device) -> None:
    """Queue ~100 ms of kernels on ``device``'s current stream (nothing on the CPU)."""
    if device.type == "cuda":
        a = torch.randn(2048, 2048, device=device)
        for _ in range(40):
            a = a @ a
            a /= a.abs().max()


@pytest.mark.parametrize("device_name", DEVICES)
def test_a_change_queued_before_a_save_is_in_it_and_one_after_it_returns_is_not(root, device_name):
    device = device_of(device_name)
    g = torch.Generator(device=device).manual_seed(1)
    frozen = torch.randn(4 << 20, device=device, generator=g)  # 16 MiB, linked when unchanged
    first, second = frozen.cpu().clone(), (frozen + 1).cpu()
    with ckptstore.Checkpointer(root, codec="none", incremental=True, full_every=0) as ckpt:
        ckpt.save({"w": frozen}, step=1)
        ckpt.save({"w": frozen}, step=2)  # linked
        keep_busy(device)
        frozen.add_(1)  # queued behind the kernels: the save must wait for it
        ckpt.save_async({"w": frozen}, step=3).wait(timeout=120)
        # What changed for certain (its counter moved) is written without a hash, so
        # the save after it hashes it and writes it again; the one after that links it.
        ckpt.save({"w": frozen}, step=4)
        pending = ckpt.save_async({"w": frozen}, step=5)
        pending.staged.result(timeout=120)
        frozen.add_(1)  # right after staging: in step 6, never in step 5
        pending.wait(timeout=120)
        ckpt.save({"w": frozen}, step=6)
        want = {1: first, 2: first, 3: second, 4: second, 5: second, 6: frozen.cpu()}
        for step, value in want.items():
            got = {"w": torch.zeros_like(frozen)}
            ckpt.load(got, step)
            assert torch.equal(got["w"].cpu(), value), f"step {step} holds another value"
        linked = {r.step: bool(r.manifest.linked) for r in ckpt.list()}
        assert linked == {1: False, 2: True, 3: False, 4: False, 5: True, 6: False}, linked


@pytest.mark.parametrize("device_name", DEVICES)
def test_a_write_behind_the_version_counter_is_saved_not_linked_over(root, device_name):
    device = device_of(device_name)
    frozen = torch.randn(1 << 20, device=device)
    with ckptstore.Checkpointer(root, codec="none", incremental=True, full_every=0) as ckpt:
        ckpt.save({"w": frozen}, step=1)
        version = frozen._version
        frozen.data.mul_(2)  # .data has a counter of its own: frozen's does not move
        assert frozen._version == version
        ckpt.save({"w": frozen}, step=2)
        got = {"w": torch.zeros_like(frozen)}
        ckpt.load(got, 2)
        assert torch.equal(got["w"], frozen), "a stale copy was linked over the new bytes"


@pytest.mark.cuda
def test_trusting_version_counters_on_the_gpu_still_hashes_every_save(root):
    """On the CPU a trusted tensor written behind its counter fails the save
    (test_incremental); on a GPU nothing is trusted, so the save holds the new bytes."""
    device = device_of("cuda")
    frozen = torch.randn(1 << 20, device=device)
    cfg = dict(codec="none", incremental=True, full_every=0, trust_version_counters=True)
    with ckptstore.Checkpointer(root, **cfg) as ckpt:
        for step in (1, 2, 3):  # past the point where a CPU tensor would be trusted
            ckpt.save({"w": frozen}, step=step)
        frozen.data.mul_(2)
        try:
            ckpt.save({"w": frozen}, step=4)
        except StateChangedError as exc:  # pragma: no cover - what this test rules out
            pytest.fail(f"a GPU tensor was trusted: {exc}")
        got = {"w": torch.zeros_like(frozen)}
        ckpt.load(got, 4)
        assert torch.equal(got["w"], frozen)


@pytest.mark.parametrize("device_name", DEVICES)
def test_a_restart_onto_the_device_links_its_first_save_from_the_checkpoint_loaded(
    root, device_name
):
    device = device_of(device_name)
    model, opt = fresh(device)
    with ckptstore.Checkpointer(root, codec="none", incremental=True, full_every=0) as ckpt:
        for step in (1, 2):
            train_step(model, opt, device, step)
            ckpt.save({"model": model, "optim": opt}, step=step)
    model, opt = fresh(device)
    train_step(model, opt, device, 99)
    with ckptstore.Checkpointer(root, codec="none", incremental=True, full_every=0) as ckpt:
        assert ckpt.load({"model": model, "optim": opt}).step == 2
        train_step(model, opt, device, 3)
        result = ckpt.save({"model": model, "optim": opt}, step=3)
        assert ckpt.list()[-1].manifest.linked, "the first save after the restart linked nothing"
        assert result.stored_bytes < 0.1 * frozen_bytes(model)


@pytest.mark.cuda
def test_reference_loop_on_cuda_fine_tuning_incremental_sigterm_then_rerun_is_identical(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    extra = ("--device", "cuda", "--freeze-blocks", "--incremental", "--full-every", "0")
    assert_sigterm_then_rerun_equals_the_uninterrupted_run(tmp_path, *extra)
    out = run(train_cmd(tmp_path / "a", tmp_path / "r.json", "--steps", "50", *extra))
    assert out.returncode == 0, out.stdout + out.stderr
    manifests = [
        json.loads(p.read_text()) for p in sorted((tmp_path / "a").glob("*/manifest.json"))
    ]
    assert len(manifests) == 3 and all(m["linked"] for m in manifests), manifests
