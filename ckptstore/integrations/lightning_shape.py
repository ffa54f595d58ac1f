"""What a Lightning checkpoint's dict loses as DCP paths, and how it comes back.

DCP stores a nested dict as flat paths of string keys: dict keys that are ints come back
as strings, and containers holding nothing are not stored at all. :func:`prepare` notes
both (and turns ``argparse.Namespace`` values into dicts) before a save; the note goes
into the manifest's metadata, and :func:`restore_shape` undoes the loss after a load.
:func:`map_location` moves a loaded state as ``torch.load``'s argument of that name would.
No Lightning import here.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ckptstore.errors import InvalidArgumentTypeError

Path = tuple[str | int, ...]


def prepare(checkpoint: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``checkpoint`` with Namespaces as dicts, and what reading it back needs to know:
    the paths of dicts keyed by ints and of containers holding nothing (which the stored
    paths do not record), each as DCP names it (dict keys as strings)."""
    if not isinstance(checkpoint, dict):
        raise InvalidArgumentTypeError(
            f"checkpoint must be a dict, got {type(checkpoint).__name__}"
        )
    int_keyed: list[list[str | int]] = []
    empty: list[list[Any]] = []

    def walk(obj: Any, path: Path) -> tuple[Any, bool]:
        """(the converted value, whether it holds anything DCP stores)."""
        if isinstance(obj, argparse.Namespace):
            obj = vars(obj)
        if isinstance(obj, dict):
            keys = list(obj)
            if any(type(k) is int for k in keys):
                int_keyed.append(list(path))
            out: dict[Any, Any] = {}
            filled = False
            for k in keys:
                out[k], has = walk(obj[k], (*path, str(k)))
                filled = filled or has
            if not filled:
                empty.append([*path, "dict"])
            return out, filled
        if isinstance(obj, list) and obj:
            items = [walk(v, (*path, i)) for i, v in enumerate(obj)]
            filled = any(has for _, has in items)
            if not filled:
                empty.append([*path, "list"])
            return [v for v, _ in items], filled
        return obj, True  # a value, a tensor, or an empty list (stored as a value)

    state, _ = walk(checkpoint, ())
    return state, {"int_keys": int_keyed, "empty": [e for e in empty if len(e) > 1]}


def restore_shape(state: dict[str, Any], shape: Any) -> None:
    """Undo what the stored paths lost (see :func:`prepare`): empty containers first,
    outermost first; then int keys, innermost first (their paths name string keys)."""
    if not isinstance(shape, dict):
        return
    for entry in sorted(shape.get("empty", []), key=len):
        *path, kind = entry
        parent: Any = state
        for part in path[:-1]:
            parent = parent[part] if _has(parent, part) else None
            if parent is None:
                break
        last = path[-1]
        if parent is None or _has(parent, last):
            continue
        value: Any = {} if kind == "dict" else []
        if isinstance(parent, dict):
            parent[last] = value
        elif isinstance(parent, list) and isinstance(last, int):
            parent.extend([None] * (last + 1 - len(parent)))
            parent[last] = value
    for path in sorted(shape.get("int_keys", []), key=len, reverse=True):
        node: Any = state
        for part in path:
            node = node[part] if _has(node, part) else None
            if node is None:
                break
        if isinstance(node, dict):
            converted = {_int_key(k): v for k, v in node.items()}
            node.clear()
            node.update(converted)


def _has(container: Any, key: Any) -> bool:
    if isinstance(container, dict):
        return key in container and container[key] is not None
    if isinstance(container, list) and isinstance(key, int):
        return 0 <= key < len(container) and container[key] is not None
    return False


def _int_key(key: Any) -> Any:
    if isinstance(key, str) and key.lstrip("-").isdigit() and str(int(key)) == key:
        return int(key)
    return key


def map_location(state: dict[str, Any], map_location: Any) -> dict[str, Any]:
    if map_location is None or callable(map_location):
        return state  # a callable (torch.load's storage hook) has no tensor to act on here
    if isinstance(map_location, dict):
        map_location = map_location.get("cpu")
        if map_location is None:
            return state
    device = torch.device(map_location)
    if device.type == "cpu":
        return state

    def move(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj.to(device)
        if isinstance(obj, dict):
            return {k: move(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [move(v) for v in obj]
        return obj

    return dict(move(state))
