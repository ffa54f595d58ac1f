"""A Hugging Face Accelerate training loop checkpointed by ckptstore.

    python examples/accelerate_example.py --ckpt-dir runs/acc --steps 40
    torchrun --nproc_per_node=2 examples/accelerate_example.py --ckpt-dir runs/acc2

Stop it at any point (Ctrl+C, SIGTERM: the manager saves and exits) and run the same
command again: it resumes where it stopped, and on CPU the result is bit-identical to
an uninterrupted run. ``--stop-after N`` stops after step N the same way (for tests).
"""

from __future__ import annotations

import argparse
import os

import torch
from accelerate import Accelerator

import ckptstore
from ckptstore.integrations.accelerate import accelerate_state


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt-dir", default="runs/accelerate")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument("--stop-after", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the final weights here (torch.save)")
    args = ap.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 16, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())
    loader = ckptstore.ResumableDataLoader(
        data,
        batch_size=16,
        seed=0,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    state = accelerate_state(accelerator, model, optimizer, scheduler, dataloader=loader)
    with (
        ckptstore.CheckpointManager(
            args.ckpt_dir, save=ckptstore.SaveEvery(steps=args.save_every)
        ) as mgr,
        mgr.guard(state),
    ):
        step = mgr.restore(state)
        while step < args.steps:
            for xb, yb in loader:
                xb, yb = xb.to(accelerator.device), yb.to(accelerator.device)
                loss = torch.nn.functional.mse_loss(model(xb), yb)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                mgr.maybe_save(step, state, epoch=loader.epoch)
                step += 1
                if step == args.stop_after:
                    os.kill(os.getpid(), 15)  # as a scheduler's SIGTERM would
                if step >= args.steps:
                    break
        # Leaving mgr.guard() normally saves the last step (if the policy did not) as final.
    if args.out and accelerator.is_main_process:
        torch.save(accelerator.unwrap_model(model).state_dict(), args.out)


if __name__ == "__main__":
    main()
