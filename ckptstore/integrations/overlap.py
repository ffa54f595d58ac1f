"""Copying a TrainState in the background, safely: the training loop goes on while
its tensors are copied, and whatever would change them waits for the copy.

``CheckpointManager`` saves a :class:`~ckptstore.TrainState` this way by default
(``ManagerConfig(overlap_copy=False)`` turns it off): ``maybe_save`` returns once the
staging buffer is reserved and the Python values are serialized, and the tensors are
copied on the writer thread while the next forward and backward passes run. Before
anything saved can change, the training thread waits for the copy to finish:

* ``optimizer.step()`` (a step pre-hook on the optimizer, inside any wrapper;
  ``GradScaler.step`` calls it too);
* the forward pass of modules that update buffers as they run (BatchNorm and others
  with ``track_running_stats``), through a forward pre-hook on each.

The time spent waiting is counted in ``TrainState.copy_wait_s`` (the stall a user
sees). Anything else that changes a tensor in place between ``maybe_save`` and the
next ``optimizer.step()`` (an in-place edit of a parameter, a manual EMA update) is
caught: every tensor's version counter is compared after the copy, and a save whose
tensors changed is abandoned (logged as an error, never written torn); later saves of
that state then copy before returning.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from ckptstore.errors import StateChangedError

if TYPE_CHECKING:
    from ckptstore.integrations.trainstate import TrainState

log = logging.getLogger("ckptstore")


class CopyGuard:
    """One background copy of a TrainState's tensors (``StagingGuard`` for
    ``Checkpointer.save_async``)."""

    def __init__(self, state: TrainState) -> None:
        self._state = state
        self._versions: list[tuple[str, torch.Tensor, int]] = []

    def snapshot(self) -> None:
        self._versions = [(name, t, t._version) for name, t in _tensors(self._state)]

    def check(self) -> None:
        changed = [name for name, t, version in self._versions if t._version != version]
        self._versions = []
        if changed:
            self._state._overlap_broken = True
            shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
            raise StateChangedError(
                f"{len(changed)} tensor(s) changed in place while this save copied them in "
                f"the background ({shown}): abandoned rather than saved torn. The next "
                "saves of this state copy before returning; to keep overlapping, change "
                "saved tensors only through optimizer.step() between saves",
                changed,
            )

    def hold(self, staged: concurrent.futures.Future[Any]) -> None:
        """The training thread waits for ``staged`` before the state may change."""
        self._state._copies.append(staged)


def install_waits(state: TrainState) -> None:
    """The hooks that make the training thread wait for copies in flight (once)."""
    if state._wait_hooks:
        return
    from ckptstore.integrations.trainstate import base_optimizer

    def wait(*_: Any) -> None:
        wait_for_copies(state)

    hooks = []
    if state.optimizer is not None:
        hooks.append(base_optimizer(state.optimizer).register_step_pre_hook(wait))
    if state.model is not None:
        for module in state.model.modules():
            if getattr(module, "track_running_stats", False):
                hooks.append(module.register_forward_pre_hook(wait))
    state._wait_hooks = hooks


def wait_for_copies(state: TrainState) -> None:
    """Block until every background copy of ``state`` is done (its outcome is the
    save's business); the time counts as stall."""
    copies, state._copies = state._copies, []
    if copies:
        start = time.perf_counter()
        concurrent.futures.wait(copies)
        state.copy_wait_s += time.perf_counter() - start


def _tensors(state: TrainState) -> list[tuple[str, torch.Tensor]]:
    """Every tensor a save of ``state`` copies that the loop can change in place."""
    out: list[tuple[str, torch.Tensor]] = []
    if state.model is not None:
        out += [(f"model.{n}", p) for n, p in state.model.named_parameters()]
        out += [(f"model.{n}", b) for n, b in state.model.named_buffers()]
    if state.optimizer is not None:
        from ckptstore.integrations.trainstate import base_optimizer

        for i, per_param in enumerate(base_optimizer(state.optimizer).state.values()):
            for key, value in per_param.items():
                if isinstance(value, torch.Tensor):
                    out.append((f"optim.state[{i}].{key}", value))
    return out
