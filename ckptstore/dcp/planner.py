"""Planners: DCP's defaults, with staged values on save and no unsafe unpickling on load."""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.planner import ReadItem, WriteItem, WriteItemType

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


class StagedSavePlanner(DefaultSavePlanner):
    """Saves a state dict that staging already flattened with DCP's own rules.

    ``mappings`` are the ones DCP's ``flatten_state_dict`` produced for the user's
    nested state dict; DCP stores them as ``planner_data`` so that tools can rebuild
    the nesting without a target state dict.
    """

    def __init__(self, mappings: dict[str, Any]) -> None:
        super().__init__(flatten_state_dict=True, flatten_sharded_tensors=True)
        self._staged_mappings = mappings

    def set_up_planner(
        self,
        state_dict: dict[str, Any],
        storage_meta: StorageMeta | None = None,
        is_coordinator: bool = False,
    ) -> None:
        super().set_up_planner(state_dict, storage_meta, is_coordinator)
        self.mappings = self._staged_mappings

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
