"""The non-tensor values of a state (an optimizer's ``param_groups``, step counters,
a scheduler's state): serialized on the caller's thread when the state is staged, and
checked there to load back with ``torch.load(weights_only=True)``, so a value that
could not be loaded safely fails the save at once with the key that holds it, not at
restore time.

Serializing a value costs ~0.3 ms (a ``torch.save`` and a ``torch.load``), and the
training loop waits for it: 12 values (AdamW's param groups) took ~4 ms of every save.
They rarely change from save to save, so :class:`ValueCache` keeps each key's last
serialized bytes and gives them again while the value is the same: plain values only
(``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes`` and ``tuple``, ``list``
and ``dict`` of them, exact types), compared by their pickle, which records every
type, every float's bits and which objects are shared, so equal pickles serialize to
equal bytes. Anything else is serialized every time.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch

from ckptstore.dcp.planner import SerializedValue
from ckptstore.errors import UnsupportedStateError

_PLAIN = frozenset({type(None), bool, int, float, str, bytes})
_MAX_NODES = 4096  # a value larger than this is not kept (nor walked further)
_MAX_BYTES = 256 << 10  # nor one whose pickle or serialized bytes are larger


def serialize(fqn: str, value: Any) -> SerializedValue:
    """``value`` as :func:`torch.save` writes it, once it is proven to load back with
    ``weights_only=True``; raises UnsupportedStateError naming ``fqn`` otherwise."""
    if isinstance(value, io.BytesIO):
        # DCP's convention for opaque bytes (torchtitan's train state): stored as the
        # bytes it holds, loaded back into the target's BytesIO (SafeLoadPlanner).
        value = value.getvalue()
    buf = io.BytesIO()
    try:
        torch.save(value, buf)
    except Exception as exc:
        raise UnsupportedStateError(
            f"state_dict[{fqn!r}] ({type(value).__name__}) cannot be saved: {exc}"
        ) from None
    data = buf.getvalue()
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise UnsupportedStateError(
            f"state_dict[{fqn!r}] is a {type(value).__module__}.{type(value).__qualname__}, which "
            "could not be loaded back without unpickling arbitrary code (torch.load with "
            "weights_only=True refuses it). Store it as tensors or plain Python values "
            f"(numbers, strings, lists, tuples, dicts). ({first})"
        ) from None
    return SerializedValue(data)


def plain_key(value: Any) -> bytes | None:
    """The pickle of ``value`` if it is a small plain value (module doc), else None
    (then :func:`serialize` reports whatever keeps it from being saved)."""
    todo, nodes, size = [value], 0, 0
    while todo:
        v = todo.pop()
        nodes += 1
        if nodes > _MAX_NODES:
            return None
        kind = type(v)
        if kind is str or kind is bytes:
            size += len(v)
            if size > _MAX_BYTES:
                return None  # not pickled only to be thrown away
        elif kind in _PLAIN:
            continue
        elif kind is tuple or kind is list:
            todo.extend(v)
        elif kind is dict:
            todo.extend(v.keys())
            todo.extend(v.values())
        else:
            return None
    try:
        key = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except RecursionError:  # nested deeper than pickle goes
        return None
    return key if len(key) <= _MAX_BYTES else None


class ValueCache:
    """Each key's value at the last save, and its serialized bytes (module doc). Holds
    the keys of the last state serialized only."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[bytes, SerializedValue]] = {}

    def clear(self) -> None:
        self._kept = {}

    def serialize_all(self, values: dict[str, Any]) -> dict[str, SerializedValue]:
        """fqn -> serialized value, for each of ``values`` (fqn -> value)."""
        kept: dict[str, tuple[bytes, SerializedValue]] = {}
        out: dict[str, SerializedValue] = {}
        for fqn, value in values.items():
            key = plain_key(value)
            last = self._kept.get(fqn)
            if key is not None and last is not None and last[0] == key:
                out[fqn] = last[1]
            else:
                out[fqn] = serialize(fqn, value)
            if key is not None and len(out[fqn].data) <= _MAX_BYTES:
                kept[fqn] = (key, out[fqn])
        self._kept = kept
        return out
