"""Resuming a :class:`~ckptstore.TrainState` from a checkpoint in a layout people wrote
with ``torch.save`` before ckptstore, once ``ckptstore import`` has brought it in.

Two layouts are recognised by their top-level keys:

* the common one: ``model_state_dict``, ``optimizer_state_dict``,
  ``scheduler_state_dict`` (or ``lr_scheduler_state_dict``), ``scaler_state_dict``,
  ``epoch``, ``global_step`` / ``step``, ``best_val_loss`` / ``best_loss``, ``config``;
* nanoGPT's: ``model``, ``optimizer``, ``model_args``, ``iter_num``,
  ``best_val_loss``, ``config`` (``_orig_mod.`` prefixes of a compiled model removed).

Each part goes where that script's own resume code put it: ``model.load_state_dict``,
``optimizer.load_state_dict`` (integer parameter ids restored), the scheduler's and
scaler's ``load_state_dict``; the epoch and the best validation loss into the state's
counters. The step comes from the checkpoint's manifest (``ckptstore import`` takes it
from ``iter_num`` / ``global_step`` / ``step`` when ``--step`` is not given). These
files hold no random generator or data-loader state: a resumed run draws other batches
than the original would have.
"""

from __future__ import annotations

from typing import Any

from torch.distributed.checkpoint.metadata import Metadata

from ckptstore.convert import restore_optimizer_keys
from ckptstore.engine.ops import fill_from_checkpoint

# stored top-level key -> the part of a TrainState it restores
_SEED = {
    "model_state_dict": "model",
    "optimizer_state_dict": "optimizer",
    "scheduler_state_dict": "scheduler",
    "lr_scheduler_state_dict": "scheduler",
    "scaler_state_dict": "scaler",
    "epoch": "epoch",
    "best_val_loss": "best",
    "best_loss": "best",
}
_NANOGPT = {"model": "model", "optimizer": "optimizer", "best_val_loss": "best"}
_COMPILED = "_orig_mod."


def layout_of(stored: set[str]) -> dict[str, str] | None:
    """The legacy layout whose keys the checkpoint's top level has, or None (ckptstore's
    own layout, or one not recognised)."""
    if "counters" in stored:
        return None  # written by a TrainState
    if "model_state_dict" in stored:
        return {k: v for k, v in _SEED.items() if k in stored}
    if "model" in stored and "iter_num" in stored:
        return {k: v for k, v in _NANOGPT.items() if k in stored}
    return None


def target_for(metadata: Metadata, layout: dict[str, str]) -> dict[str, Any]:
    """The checkpoint's parts in ``layout``, shaped as stored, to load into."""
    target: dict[str, Any] = {}
    fill_from_checkpoint(target, metadata, lambda path: str(path[0]) in layout)
    return target


def apply(state: Any, sd: dict[str, Any], layout: dict[str, str]) -> None:
    """Put what was loaded (``sd``, shaped by :func:`target_for`) into ``state``'s parts."""
    restore_optimizer_keys(sd)
    for key, part in layout.items():
        value = sd.get(key)
        if value is None:
            continue
        if part == "model" and state.model is not None:
            model = getattr(state.model, "module", state.model)  # DDP
            model.load_state_dict(
                {k[len(_COMPILED) :] if k.startswith(_COMPILED) else k: v for k, v in value.items()}
            )
        elif part == "optimizer" and state.optimizer is not None:
            from ckptstore.integrations.trainstate import base_optimizer

            base_optimizer(state.optimizer).load_state_dict(value)
        elif part == "scheduler" and state.scheduler is not None:
            state.scheduler.load_state_dict(value)
        elif part == "scaler" and state.scaler is not None and value:
            state.scaler.load_state_dict(value)
        elif part == "epoch":
            state.epoch = int(value)
        elif part == "best":
            state.best["val_loss"] = float(value)
