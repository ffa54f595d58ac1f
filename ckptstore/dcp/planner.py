"""Planners: DCP's defaults, with staged values on save and no unsafe unpickling on load."""

from __future__ import annotations

import dataclasses
import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint._dedup_save_plans import dedup_save_plans
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem, SavePlan, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor

from ckptstore.errors import CorruptCheckpointError, UnsafeCheckpointError


class SerializedValue:
    """A non-tensor ``state_dict`` value, serialized when it was staged.

    Serializing at staging time freezes the value (later mutation by the training loop
    cannot reach the save) and proves early, on the caller's thread, that it will load
    back with ``torch.load(weights_only=True)``.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class LocalPlans:
    """DCP's local plans of the last few layouts saved, one per arena in flight.

    A local plan depends only on what the state holds, not on its values: keys, and per
    tensor its dtype, shape, DTensor spec and whether its memory is pinned. The caller
    vouches for that with a key: a layout object (compared by identity: staging makes a
    new one whenever anything in it changes) and a tuple of the rest (compared by value).
    Plans are never changed once made (DCP's steps replace, not mutate, them).
    """

    def __init__(self, keep: int = 2) -> None:
        self._keep = keep
        self._kept: list[tuple[tuple[object, tuple[Any, ...]], SavePlan]] = []

    def get(self, key: tuple[object, tuple[Any, ...]]) -> SavePlan | None:
        for (layout, rest), plan in self._kept:
            if layout is key[0] and rest == key[1]:
                return plan
        return None

    def put(self, key: tuple[object, tuple[Any, ...]], plan: SavePlan) -> None:
        self._kept = [(key, plan), *self._kept][: self._keep]


# What a staged state holds beside DTensors, as exact types (StagedSavePlanner)
_STAGED = frozenset({torch.Tensor, torch.nn.Parameter, SerializedValue})


class StagedSavePlanner(DefaultSavePlanner):
    """Saves a state dict that staging already flattened with DCP's own rules.

    ``mappings`` are the ones DCP's ``flatten_state_dict`` produced for the user's
    nested state dict; DCP stores them as ``planner_data`` so that tools can rebuild
    the nesting without a target state dict.
    """

    def __init__(
        self,
        mappings: dict[str, Any],
        kept: LocalPlans | None = None,
        layout: tuple[object, tuple[Any, ...]] | None = None,
    ) -> None:
        super().__init__(flatten_state_dict=True, flatten_sharded_tensors=True)
        self._staged_mappings = mappings
        self._kept = kept
        self._layout = layout

    def create_local_plan(self) -> SavePlan:
        """DCP's local plan; with ``kept`` and a ``layout`` it planned before, that plan
        again (~7 us a tensor not spent; the same plan object also makes the plan
        cache's comparison with the last plan one identity check per item)."""
        if self._kept is None or self._layout is None:
            return super().create_local_plan()
        layout, rest = self._layout
        key = (layout, (*rest, self.is_coordinator))
        plan = self._kept.get(key)
        if plan is None:
            plan = super().create_local_plan()
            self._kept.put(key, plan)
        self.plan = plan
        return plan

    def set_up_planner(
        self,
        state_dict: dict[str, Any],
        storage_meta: StorageMeta | None = None,
        is_coordinator: bool = False,
    ) -> None:
        """DCP's set-up. A staged state is flat already (fqn -> tensor, DTensor or
        serialized value; staging refuses ShardedTensors), so DCP's two walks over it
        (flattening, then ShardedTensors), each giving back the same keys and values,
        are skipped: ~2 ms a save at 260 items here. Only where every value is one of
        those (exact types: a ShardedTensor is a torch.Tensor subclass); anything else
        goes through DCP's walks."""
        if all(type(v) in _STAGED or isinstance(v, DTensor) for v in state_dict.values()):
            self.state_dict = dict(state_dict)
            self.is_coordinator = is_coordinator
        else:
            super().set_up_planner(state_dict, storage_meta, is_coordinator)
        self.mappings = self._staged_mappings

    def _create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        """DCP's plan; but where ranks write to different disks (node-local roots, told
        by the writer's local plans), what several ranks hold is written once per disk,
        not once in all, so that each disk's part holds all that its ranks load."""
        global_plan, metadata = super()._create_global_plan(all_plans)
        disks = [getattr(p.storage_data, "disk", "") for p in all_plans]
        if len(set(disks)) < 2:
            return global_plan, metadata
        hinted = {item.index: item for plan in global_plan for item in plan.items}
        kept: list[list[WriteItem]] = [[] for _ in all_plans]
        for disk in set(disks):
            ranks = [r for r, d in enumerate(disks) if d == disk]
            deduped = dedup_save_plans(
                [all_plans[r] for r in ranks], self.dedup_save_to_lowest_rank
            )
            for r, plan in zip(ranks, deduped, strict=True):
                # DCP's index hints (an item's place among its tensor's chunks) come from
                # the global plan; an index compares equal without its hint.
                kept[r] = [hinted[item.index] for item in plan.items]
        return [
            dataclasses.replace(plan, items=items)
            for plan, items in zip(global_plan, kept, strict=True)
        ], metadata

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:
        if write_item.type == WriteItemType.BYTE_IO and isinstance(object, SerializedValue):
            return io.BytesIO(object.data)
        return super().transform_object(write_item, object)


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, but Python values load with ``torch.load(weights_only=True)``.

    DCP's own planner uses ``weights_only=False``: a checkpoint could run code.
    """

    def __init__(self, *, allow_partial_load: bool = False) -> None:
        super().__init__(allow_partial_load=allow_partial_load)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"value {fqn!r} asks to unpickle something outside torch's weights_only "
                f"allowlist; refused ({_first_line(exc)})"
            ) from None
        except Exception as exc:
            # Checksums matched, yet it does not parse: written wrong, or crafted.
            raise CorruptCheckpointError(
                f"value {fqn!r} does not load: {type(exc).__name__}: {_first_line(exc)}"
            ) from None
        if isinstance(obj, bytes) and isinstance(self.state_dict.get(fqn), io.BytesIO):
            obj = io.BytesIO(obj)  # a BytesIO was saved as its bytes; into one it goes back
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
