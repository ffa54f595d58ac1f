"""The CUDA path on real GPUs (every test marked ``cuda``: skipped, with the reason, on a
machine without enough of them; ``benchmarks/gpu_check.sh`` runs them).

* A tensor changed right after ``staged`` is saved as it was, on cuda:0 (from the
  default and from a side stream) and, with two GPUs, on cuda:1 from the writer thread while the caller's current device is cuda:0
  and its current stream a side stream. The value saved is written by GPU work queued
  behind slow kernels just before the save, so a copy not ordered after the caller's
  stream reads the old value, and a ``staged`` that resolves before the copies land
  lets the change after it leak into the checkpoint.
* Staging memory is pinned at the state's exact size, and reported so.
* Bit-exact reloads: GPU -> GPU, GPU -> CPU, CPU -> GPU, through a Checkpointer and
  through the one-shot ``ckptstore.save`` / ``load``; a load onto the GPU decodes into
  pinned memory and gives it back at its end.
* CUDA generator states round-trip.
* The reference loop on ``--device cuda``: SIGTERM + rerun equals the run never stopped;
  with two GPUs, torchrun with NCCL + FSDP2 saves and one process resumes it; on one GPU,
  an NCCL group and FSDP2 under torchrun save and reload bit-exact.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest
import torch
from helpers import every_dtype
from test_train import (
    TINY,
    assert_sigterm_then_rerun_equals_the_uninterrupted_run,
    report,
    run,
    train_cmd,
)

import ckptstore
from ckptstore.integrations.trainstate import rng_state, set_rng_state

N = 32 << 20  # floats: 128 MiB, so that a copy takes long enough to race with


def on(state: Any, device: str | torch.device) -> Any:
    if isinstance(state, torch.Tensor):
        return state.to(device)
    if isinstance(state, dict):
        return {k: on(v, device) for k, v in state.items()}
    return state


def blank(state: Any, device: str | torch.device) -> Any:
    if isinstance(state, torch.Tensor):
        return torch.zeros(state.shape, dtype=state.dtype, device=device)
    if isinstance(state, dict):
        return {k: blank(v, device) for k, v in state.items()}
    return state


def assert_bytes_equal(want: Any, got: Any, path: str = "") -> None:
    """Bit-exact, wherever each side lives."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype, path
        assert got.shape == want.shape, path
        if want.numel():
            a, b = (plain_bytes(t) for t in (want, got))
            assert torch.equal(a, b), f"{path}: bytes differ"
        return
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(want) == set(got), path
        for k in want:
            assert_bytes_equal(want[k], got[k], f"{path}.{k}")
        return
    assert want == got, path


def plain_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t``'s values, on the CPU (lazy conjugation / negation applied)."""
    t = t.detach().cpu().resolve_conj().resolve_neg()
    return t.contiguous().reshape(-1).view(torch.uint8)


def keep_busy(device: torch.device, ms: float = 200) -> None:
    """Queue about ``ms`` of kernels on the current stream of ``device``."""
    a = torch.randn(4096, 4096, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    a @ a
    end.record()
    end.synchronize()
    per = max(start.elapsed_time(end), 0.01)
    for _ in range(int(ms / per) + 1):
        a = a @ a
        a /= a.abs().max()


def check_change_after_staged(root: str, device: torch.device, block: bool) -> None:
    want = torch.randn(N, device=device)
    odd = torch.randn(1001, device=device).half()
    odd_want = odd.cpu()
    w = torch.zeros_like(want)
    with ckptstore.Checkpointer(root) as ckpt:
        keep_busy(device)
        w.copy_(want)  # runs only after the busy kernels: the copy must wait for it
        pending = ckpt.save_async({"w": w, "odd": odd}, 1, block_until_staged=block)
        pending.staged.result(timeout=120)
        w.add_(1)  # the caller's next step changes its tensors at once
        odd.zero_()
        pending.wait(timeout=120)
        target = {"w": torch.empty(N), "odd": torch.empty(1001, dtype=torch.half)}
        ckpt.load(target, 1)
    assert torch.equal(target["w"], want.cpu()), "the checkpoint holds another value of w"
    assert torch.equal(target["odd"], odd_want), "the checkpoint holds another value of odd"


@pytest.mark.cuda
@pytest.mark.parametrize("block", [True, False], ids=["blocking", "writer-thread"])
def test_a_change_right_after_staged_is_not_saved_on_cuda0(root, block):
    torch.cuda.set_device(0)
    check_change_after_staged(root, torch.device("cuda:0"), block)


@pytest.mark.cuda
@pytest.mark.parametrize("block", [True, False], ids=["blocking", "writer-thread"])
def test_a_change_right_after_staged_is_not_saved_on_cuda0_from_a_side_stream(root, block):
    torch.cuda.set_device(0)
    side = torch.cuda.Stream(device=0)
    with torch.cuda.stream(side):  # the caller's current stream: not the default one
        check_change_after_staged(root, torch.device("cuda:0"), block)
    side.synchronize()


@pytest.mark.cuda(gpus=2)
@pytest.mark.parametrize("block", [True, False], ids=["blocking", "writer-thread"])
def test_a_change_right_after_staged_is_not_saved_on_cuda1_from_a_side_stream(root, block):
    device = torch.device("cuda:1")
    side = torch.cuda.Stream(device=device)
    with torch.cuda.stream(side):  # the current stream of cuda:1: not the default one
        # torch.cuda.stream also made cuda:1 the current device: the caller's current
        # device must not be where the state is.
        torch.cuda.set_device(0)
        check_change_after_staged(root, device, block)
    side.synchronize()


@pytest.mark.cuda
def test_staging_memory_is_pinned_at_its_exact_size(root):
    state = {"a": torch.randn((3 << 20) + 17, device="cuda"), "b": torch.randn(5, device="cuda")}
    with ckptstore.Checkpointer(root) as ckpt:
        ckpt.save(state, 1)
        held = ckpt.staging_bytes
        # 12 MiB and a bit, plus alignment: not rounded up to 16 MiB (a power of two).
        assert (3 << 20) * 4 < held < (3 << 20) * 4 + (1 << 20)
        assert ckpt.pinned_bytes == held


def cuda_state() -> dict[str, Any]:
    state = on(every_dtype(), "cuda")
    state["conj"] = state["c64"].conj()  # a lazily conjugated view
    state["mixed_cpu"] = torch.arange(10)  # a CPU tensor beside GPU ones
    return state


@pytest.mark.cuda
@pytest.mark.parametrize("onto", ["cuda", "cpu"])
def test_gpu_state_reloads_bit_exact(root, onto):
    state = cuda_state()
    with ckptstore.Checkpointer(root) as ckpt:
        ckpt.save(state, 1)
        target = blank(state, onto)
        ckpt.load(target, 1)
    assert_bytes_equal(state, target)
    if onto == "cuda":
        assert target["f32"].device.type == "cuda"


@pytest.mark.cuda
def test_cpu_state_reloads_onto_the_gpu_bit_exact(root):
    state = every_dtype()
    with ckptstore.Checkpointer(root) as ckpt:
        ckpt.save(state, 1)
        target = blank(state, "cuda")
        ckpt.load(target, 1)
    assert_bytes_equal(state, target)


@pytest.mark.cuda
def test_a_load_onto_the_gpu_goes_through_pinned_memory_and_gives_it_back(root):
    if not hasattr(torch.cuda, "host_memory_stats"):
        pytest.skip(f"torch {torch.__version__} has no torch.cuda.host_memory_stats")
    state = {"a": torch.randn(8 << 20), "b": torch.randn(3, 5)}
    with ckptstore.Checkpointer(root) as ckpt:
        ckpt.save(state, 1)
        before = torch.cuda.host_memory_stats()
        target = blank(state, "cuda")
        ckpt.load(target, 1)
        after = torch.cuda.host_memory_stats()
    assert_bytes_equal(state, target)
    assert after.get("num_host_alloc", 0) > before.get("num_host_alloc", 0), after
    for key in ("allocated_bytes.current", "reserved_bytes.current"):  # in use; cached too
        if key in after:
            assert after[key] <= before.get(key, 0), f"pinned temporaries kept: {key}"


@pytest.mark.cuda
def test_one_shot_save_and_load_of_gpu_tensors(tmp_path):
    state = cuda_state()
    ckptstore.save(state, tmp_path / "one")
    for device in ("cuda", "cpu"):
        target = blank(state, device)
        ckptstore.load(target, tmp_path / "one")
        assert_bytes_equal(state, target)


@pytest.mark.cuda
def test_cuda_generator_states_round_trip(root):
    torch.cuda.manual_seed_all(1234)
    torch.randn(3, device="cuda")  # move the generator off its seed
    saved = rng_state()
    want = torch.randn(1000, device="cuda")
    with ckptstore.Checkpointer(root) as ckpt:
        ckpt.save({"rng": saved}, 1)
        torch.cuda.manual_seed_all(99)
        target = {"rng": rng_state()}
        ckpt.load(target, 1)
    set_rng_state(target["rng"])
    assert torch.equal(torch.randn(1000, device="cuda"), want)


@pytest.mark.cuda
def test_reference_loop_on_cuda_sigterm_then_rerun_is_identical(tmp_path, monkeypatch):
    # Bit-identical runs need cuBLAS to pick the same reductions every time.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    assert_sigterm_then_rerun_equals_the_uninterrupted_run(tmp_path, "--device", "cuda")


@pytest.mark.cuda(gpus=2)
def test_torchrun_nccl_fsdp2_two_gpus_resume_in_one(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [
        exe if os.path.exists(exe) else "torchrun", "--standalone", "--nproc_per_node=2", "-m", "ckptstore.train", *TINY,
        "--device", "cuda", "--steps", "12", "--save-every", "6", "--log-every", "6",
        "--ckpt-dir", str(tmp_path / "c"), "--report", str(tmp_path / "two.json"),
    ]  # fmt: skip
    two = run(cmd)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "x 2 process(es) (FSDP2)" in two.stdout and "cuda" in two.stdout
    saved = report(tmp_path / "two.json")
    assert saved["world_size"] == 2 and saved["step"] == 12
    manifest = json.loads((tmp_path / "c" / "step_00000012" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    one = run(train_cmd(tmp_path / "c", tmp_path / "one.json", "--steps", "12", "--device", "cuda"))
    assert one.returncode == 0, one.stdout + one.stderr
    assert "from step 12" in one.stdout
    assert report(tmp_path / "one.json")["param_digest"] == saved["param_digest"]


@pytest.mark.cuda
def test_nccl_fsdp2_on_one_gpu_saves_and_reloads_bit_exact(tmp_path):
    """The one-GPU share of the NCCL path: an NCCL process group (the Checkpointer makes
    its own gloo group beside it), FSDP2's DTensors on the GPU, a save and a reload into
    a fresh model, under torchrun. The two-GPU test above resharding needs two GPUs."""
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsdp_worker.py")
    cmd = [
        exe if os.path.exists(exe) else "torchrun", "--standalone", "--nproc_per_node=1",
        worker, "cuda", str(tmp_path / "c"),
    ]  # fmt: skip
    done = run(cmd)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fsdp_worker: bit-exact on 1 rank(s) (nccl)" in done.stdout, done.stdout
