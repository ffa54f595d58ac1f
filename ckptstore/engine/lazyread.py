"""``ckptstore.read(path, lazy=True)``: a checkpoint's state dict whose tensors are read
when first looked at, for inspection and evaluation scripts that need a few of them.

Opening reads and checks the manifest and DCP's metadata, and reads the non-tensor
values (steps, hyperparameters, optimizer param groups: small). A tensor is read, and
its bytes checked, on first access, then kept: ``state["model"]["lm_head.weight"]``
reads that one tensor. A list is read whole when first accessed (lists hold few
tensors). Nothing is read behind the caller's back and no collectives run.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from ckptstore.dcp import driver
from ckptstore.dcp.planner import SafeLoadPlanner
from ckptstore.dcp.reader import CkptStorageReader
from ckptstore.format.manifest import Manifest
from ckptstore.storage.base import StorageBackend


def nest(metadata: Metadata, flat: dict[str, Any]) -> dict[str, Any]:
    """``flat`` (one entry per stored item, named as stored) nested as it was saved."""
    stored = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    state: dict[str, Any] = {}
    for fqn, value in flat.items():
        where = stored.get(fqn)
        set_element(
            state, where if isinstance(where, tuple) and where else tuple(fqn.split(".")), value
        )
    return state


def empty_flat(metadata: Metadata, fqns: Any = None) -> dict[str, Any]:
    """Targets to load items ``fqns`` (default: all) into: an empty CPU tensor of the
    stored dtype and shape per tensor, None per other value."""
    items = metadata.state_dict_metadata
    return {
        fqn: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        if isinstance(md, TensorStorageMetadata)
        else None
        for fqn, md in ((f, items[f]) for f in (items if fqns is None else fqns))
    }


def load_flat(
    flat: dict[str, Any],
    backend: StorageBackend,
    name: str,
    manifest: Manifest,
    metadata: Metadata,
    threads: int,
) -> None:
    """Fill ``flat`` (from :func:`empty_flat`) from checkpoint ``name``, this process alone."""
    with ThreadPoolExecutor(threads, thread_name_prefix="ckptstore-codec") as pool:
        reader = CkptStorageReader(backend, name, manifest, metadata, pool)
        try:
            driver.load(flat, reader, SafeLoadPlanner(), None)
        finally:
            reader.close()


class _Stored:
    """A tensor not read yet: its stored name."""

    __slots__ = ("fqn",)

    def __init__(self, fqn: str) -> None:
        self.fqn = fqn

    def __repr__(self) -> str:
        return f"<not read yet: {self.fqn}>"


class _Source:
    """Where the tensors come from: ``load_flat``'s arguments after ``flat``."""

    def __init__(self, where: tuple[StorageBackend, str, Manifest, Metadata, int]) -> None:
        self.where = where
        self.metadata = where[3]
        self._read: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def tensors(self, fqns: list[str]) -> dict[str, torch.Tensor]:
        with self._lock:
            missing = [f for f in fqns if f not in self._read]
            if missing:
                flat = empty_flat(self.metadata, missing)
                load_flat(flat, *self.where)
                self._read.update(flat)
            return {f: self._read[f] for f in fqns}

    def resolve(self, value: Any) -> Any:
        if isinstance(value, _Stored):
            return self.tensors([value.fqn])[value.fqn]
        if isinstance(value, dict):
            return LazyStateDict(value, self)
        if isinstance(value, list):
            pending: list[str] = []
            _collect(value, pending)
            return _filled(value, self.tensors(pending))
        return value


def _collect(value: Any, into: list[str]) -> None:
    if isinstance(value, _Stored):
        into.append(value.fqn)
    elif isinstance(value, dict):
        for v in value.values():
            _collect(v, into)
    elif isinstance(value, list):
        for v in value:
            _collect(v, into)


def _filled(value: Any, read: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, _Stored):
        return read[value.fqn]
    if isinstance(value, dict):
        return {k: _filled(v, read) for k, v in value.items()}
    if isinstance(value, list):
        return [_filled(v, read) for v in value]
    return value


class LazyStateDict(Mapping[str, Any]):
    """A read-only mapping over one level of a checkpoint's state dict; tensors are read
    on first access (see the module's docstring). ``materialize()`` reads the rest and
    returns plain dicts."""

    def __init__(self, node: dict[str, Any], source: _Source) -> None:
        self._node = node
        self._source = source

    def __getitem__(self, key: str) -> Any:
        return self._source.resolve(self._node[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._node)

    def __len__(self) -> int:
        return len(self._node)

    def __repr__(self) -> str:
        return f"LazyStateDict({list(self._node)!r})"

    def materialize(self) -> dict[str, Any]:
        """This level and everything under it as plain dicts, every tensor read."""
        pending: list[str] = []
        _collect(self._node, pending)
        out: dict[str, Any] = _filled(self._node, self._source.tensors(pending))
        return out


def open_lazy(
    backend: StorageBackend,
    name: str,
    manifest: Manifest,
    metadata: Metadata,
    threads: int,
) -> LazyStateDict:
    """The checkpoint ``name`` (manifest and metadata already read and checked) as a
    :class:`LazyStateDict`; its non-tensor values are read now."""
    items = metadata.state_dict_metadata
    values = [f for f, md in items.items() if not isinstance(md, TensorStorageMetadata)]
    flat: dict[str, Any] = {f: _Stored(f) for f in items}
    if values:
        small = empty_flat(metadata, values)
        load_flat(small, backend, name, manifest, metadata, threads)
        flat.update(small)
    source = _Source((backend, name, manifest, metadata, threads))
    return LazyStateDict(nest(metadata, flat), source)
