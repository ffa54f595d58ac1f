"""One rank of an FSDP2 save and reload under torchrun (run by tests/test_cuda.py).

    torchrun --standalone --nproc_per_node=N tests/fsdp_worker.py {cuda|cpu} CKPT_DIR

``cuda``: an NCCL process group and the model on this rank's GPU; ``cpu``: gloo (how
the script itself is tried without a GPU). A model sharded with ``fully_shard`` takes one
optimizer step, is saved with a Checkpointer (which makes its own gloo group beside the
caller's), and is loaded into a fresh model and optimizer; every parameter and
optimizer state must come back bit-exact. Prints one line saying so and exits 0.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import ckptstore


def build(device: torch.device, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(96, 64), torch.nn.GELU(), torch.nn.Linear(64, 10)
    ).to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(8, 96, device=device)).square().mean().backward()
    optim.step()
    optim.zero_grad()
    return model, optim


def flat(model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of the model and optimizer state, whole, on the CPU."""
    model_sd, optim_sd = get_state_dict(model, optim)
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, DTensor):
            out[prefix] = value.full_tensor().cpu()
        elif isinstance(value, torch.Tensor):
            out[prefix] = value.cpu()

    walk("model", model_sd)
    walk("optim", optim_sd)
    return out


def main(kind: str, root: str) -> None:
    if kind == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    model, optim = build(device, seed=0)
    want = flat(model, optim)
    state = {"app": ckptstore.TrainState(model=model, optimizer=optim)}
    with ckptstore.Checkpointer(root) as ckpt:
        ckpt.save(state, 1)
        fresh_model, fresh_optim = build(device, seed=1)  # other values, same layout
        assert not all(torch.equal(want[k], v) for k, v in flat(fresh_model, fresh_optim).items())
        ckpt.load({"app": ckptstore.TrainState(model=fresh_model, optimizer=fresh_optim)}, 1)
    got = flat(fresh_model, fresh_optim)
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), f"{k} differs"
    on_gpu = all(p.device.type == device.type for p in fresh_model.parameters())
    assert on_gpu, "the reloaded model left its device"
    backend = dist.get_backend()
    if dist.get_rank() == 0:
        print(
            f"fsdp_worker: bit-exact on {dist.get_world_size()} rank(s) ({backend}): "
            f"{len(want)} tensors",
            flush=True,
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
