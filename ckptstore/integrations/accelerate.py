"""Hugging Face Accelerate: a :class:`~ckptstore.TrainState` for what
``accelerator.prepare`` returned, saved and restored by a
:class:`~ckptstore.CheckpointManager` instead of ``accelerator.save_state`` /
``load_state``::

    from ckptstore.integrations.accelerate import accelerate_state

    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    loader = ckptstore.ResumableDataLoader(dataset, batch_size=8, seed=0,
                                           rank=accelerator.process_index,
                                           world_size=accelerator.num_processes)
    state = accelerate_state(accelerator, model, optimizer, scheduler, dataloader=loader)
    with ckptstore.CheckpointManager("runs/acc", save=ckptstore.SaveEvery(steps=100)) as mgr:
        start = mgr.restore(state)
        ...  # mgr.maybe_save(step, state) after each step

It covers what ``save_state`` does: the prepared model (unwrapped from DDP by DCP's
state-dict API), the optimizer inside ``AcceleratedOptimizer``, the scheduler, the
gradient scaler (``accelerator.scaler``), ``accelerator.step``, the random generators
of every rank, and the data position. Data: Accelerate's prepared loaders have no
resumable state without torchdata; give the run a
:class:`~ckptstore.ResumableDataLoader` that shards by rank itself (left unprepared:
move batches with ``.to(accelerator.device)``), or any loader with
``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ckptstore.integrations.trainstate import TrainState

__all__ = ["AcceleratorTrainState", "accelerate_state"]


@dataclass
class AcceleratorTrainState(TrainState):
    """A :class:`~ckptstore.TrainState` that also saves ``accelerator.step`` (the
    gradient-accumulation counter Accelerate keeps) and restores it."""

    accelerator: Any = field(default=None, repr=False)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self.accelerator is not None:
            sd["accelerator"] = {"step": int(self.accelerator.step)}
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        saved = sd.get("accelerator")
        if self.accelerator is not None and isinstance(saved, dict) and "step" in saved:
            self.accelerator.step = int(saved["step"])


def accelerate_state(
    accelerator: Any,
    model: nn.Module | None = None,
    optimizer: Any = None,
    scheduler: Any = None,
    *,
    dataloader: Any = None,
    extras: dict[str, Any] | None = None,
    rng: bool = True,
) -> AcceleratorTrainState:
    """The state of an Accelerate run, from the objects ``accelerator.prepare`` returned."""
    return AcceleratorTrainState(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=getattr(accelerator, "scaler", None),
        dataloader=dataloader,
        extras=dict(extras or {}),
        rng=rng,
        accelerator=accelerator,
    )
