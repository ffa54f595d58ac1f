"""Whether a target state dict fits a checkpoint, said before anything is loaded."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)

from ckptstore.engine.stager import flatten_checked
from ckptstore.errors import IncompatibleCheckpointError, UnsupportedStateError


def check_compatible(
    target: dict[str, Any],
    metadata: Metadata,
    where: str,
    *,
    allow_partial: bool = False,
    allow_cast: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Raise :class:`IncompatibleCheckpointError` listing how ``target`` differs; else
    return ``target`` flattened, with its mappings (:func:`flatten_checked`).

    Compared: keys the target has and the checkpoint lacks; shapes; tensor vs value; and
    keys the checkpoint holds inside a container that the target has but leaves empty
    (DCP would skip them silently: a freshly built optimizer, whose ``state`` is empty
    until its first step, would load nothing). Other keys the target does not name are
    not loaded, by design: pass ``{"model": ...}`` to load only the model, or only this
    rank's entry of a per-rank dict. ``allow_partial`` accepts missing keys on either side.
    A dtype that would lose values (an fp32 checkpoint into an fp16 or int64 model) is a
    difference too, unless ``allow_cast``: then loading converts. A widening (fp32 into
    fp64) converts without asking. Meta tensors cannot be loaded into.
    """
    flat, mappings = flatten_checked(target)
    meta = [fqn for fqn, obj in flat.items() if isinstance(obj, torch.Tensor) and obj.is_meta]
    if meta:
        raise UnsupportedStateError(
            f"cannot load {where} into meta tensors, which have no memory ({_first(meta)}); "
            "materialize the model first (module.to_empty(device=...)), then load"
        )
    stored = metadata.state_dict_metadata
    missing: list[str] = []
    differ: list[str] = []
    cast: list[str] = []
    for fqn, obj in flat.items():
        md = stored.get(fqn)
        if md is None:
            if not allow_partial:
                missing.append(fqn)
            continue
        is_tensor = isinstance(obj, torch.Tensor)
        if is_tensor and isinstance(md, BytesStorageMetadata):
            differ.append(f"{fqn}: a Python value in the checkpoint, a tensor here")
        elif not is_tensor and isinstance(md, TensorStorageMetadata):
            differ.append(
                f"{fqn}: a tensor {list(md.size)} in the checkpoint, a {type(obj).__name__} here"
            )
        elif (
            is_tensor
            and isinstance(md, TensorStorageMetadata)
            and tuple(obj.shape) != tuple(md.size)
        ):
            differ.append(f"{fqn}: checkpoint {list(md.size)}, target {list(obj.shape)}")
        elif (
            is_tensor
            and isinstance(md, TensorStorageMetadata)
            and not allow_cast
            and not _exact_conversion(md.properties.dtype, obj.dtype)
        ):
            cast.append(f"{fqn}: checkpoint {md.properties.dtype}, target {obj.dtype}")
    planner_data = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}

    def lands_in_empty_container(fqn: str) -> bool:
        """Whether ``fqn``'s deepest ancestor present in the target is an empty dict/list.

        That is a fresh optimizer's ``state == {}``: DCP would skip everything under it.
        A non-empty container that lacks some keys is a deliberate subset (each rank
        loading only its own per-rank entry, say) and is left alone.
        """
        path = planner_data.get(fqn)
        parts = list(path) if isinstance(path, tuple) and path else fqn.split(".")
        node: Any = target
        for part in parts[:-1]:
            present = (isinstance(node, dict) and part in node) or (
                isinstance(node, list) and isinstance(part, int) and part < len(node)
            )
            if not present:
                break
            node = node[part]
        else:
            return False
        return node is not target and isinstance(node, (dict, list)) and len(node) == 0

    skipped = sorted(k for k in set(stored) - set(flat) if lands_in_empty_container(k))
    if not missing and not differ and not cast and (allow_partial or not skipped):
        return flat, mappings
    parts = []
    if cast:
        parts.append(f"{len(cast)} dtype difference(s) ({_first(cast)})")
    if missing:
        parts.append(f"{len(missing)} key(s) missing from the checkpoint ({_first(missing)})")
    if differ:
        parts.append(f"{len(differ)} shape/kind difference(s) ({_first(differ)})")
    if skipped:
        parts.append(
            f"the checkpoint holds {len(skipped)} key(s) the target lacks under the entries being "
            f"loaded, which would be skipped ({_first(skipped)})"
        )
    advice = "load into a model and optimizer built with the same configuration"
    if skipped and not differ:
        advice = "add those keys to the target"
        if any(".state." in k for k in skipped):
            advice = (
                "a freshly built optimizer has no state until its first step: take one step "
                "first, or save and load through torch.distributed.checkpoint.state_dict."
                "get_state_dict / set_state_dict, which create it"
            )
    if cast and not differ and not missing and not skipped:
        advice = (
            "load into tensors of the stored dtypes, or pass allow_cast=True to convert "
            "while loading (an fp32 checkpoint into an fp16 or int64 model loses precision)"
        )
    if (missing or skipped) and not differ:
        advice += ", or pass allow_partial=True to load only the keys both sides have"
    raise IncompatibleCheckpointError(
        f"{where} does not fit the state_dict: {'; '.join(parts)}. Fix: {advice}"
    )


def _exact_conversion(stored: torch.dtype, target: torch.dtype) -> bool:
    """Whether every ``stored`` value is exactly a ``target`` value (the same dtype, or a
    widening: fp32 -> fp64, bf16 -> fp32, int32 -> int64); loading converts those
    without asking. Integers into floats can round, so they are not among them."""
    if stored == target:
        return True
    try:
        widened = torch.promote_types(stored, target) == target
    except RuntimeError:  # float8 and other types without promotion rules
        return False
    is_float = target.is_floating_point or target.is_complex
    from_int = not (stored.is_floating_point or stored.is_complex) and stored != torch.bool
    return widened and not (from_int and is_float)


def _first(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... {len(items) - n} more" if len(items) > n else "")
