"""DCP's ``.metadata``: pickled by DCP's own classes, unpickled only through an allowlist.

DCP stores its checkpoint metadata as a raw pickle, and ``dcp.load`` unpickles it with
``pickle.load``: a crafted ``.metadata`` runs code in the loading process. ckptstore
keeps the pickle (the metadata objects are DCP's, and DCP's planners need them) but:

1. never reads it before its size and checksum match the manifest, and
2. unpickles it with :class:`_MetadataUnpickler`, which resolves only the handful of
   globals a DCP ``Metadata`` is made of (listed below, found by pickling real
   metadata of every kind of state); anything else raises
   :class:`~ckptstore.errors.UnsafeCheckpointError` before it is touched.

The checksum guards against corruption, the allowlist against a hostile file: an
attacker who can write ``.metadata`` can rewrite the manifest too.
"""

from __future__ import annotations

import io
import pickle
import re
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint import metadata as dcp_metadata

from ckptstore.errors import CorruptCheckpointError, UnsafeCheckpointError
from ckptstore.layout import METADATA_FILE

# Object stores name it per save attempt: ".metadata-<12 hex digits>" (see
# PendingCheckpoint.stored_name).
_ATTEMPT_NAME = re.compile(r"^\.metadata-[0-9a-f]{12}$")


class StoredItem(dict):  # type: ignore[type-arg]
    """Where one item of a ckptstore checkpoint lives: ``{"file": ..., "item": ...}``.

    A dict, pickled under this class's name so that stock DCP, whose file-system reader
    expects its own per-item record (``relative_path``, ``offset``, ``length``), stops
    with a message that says what to do instead of ``'dict' object has no attribute``.
    Checkpoints written before it hold plain dicts; both read the same.
    """

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"this is a ckptstore checkpoint (chunked, checksummed, maybe compressed), which "
            f"stock DCP's FileSystemReader cannot read (it asked for {name!r}): load it with "
            "dcp.load(..., storage_reader=ckptstore.integrations.dcp.StorageReader(path)) or "
            "ckptstore.load, or convert it for stock DCP with "
            "`ckptstore export CKPT OUT_DIR --format dcp`"
        )


_DCP_CLASSES = {
    "Metadata",
    "MetadataIndex",
    "StorageMeta",
    "TensorProperties",
    "TensorStorageMetadata",
    "ChunkStorageMetadata",
    "BytesStorageMetadata",
    "_MEM_FORMAT_ENCODING",
}
_TORCH_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.distributed.checkpoint.metadata" and name in _DCP_CLASSES:
            return getattr(dcp_metadata, name)
        if module == __name__ and name == "StoredItem":
            return StoredItem
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch" and name in _TORCH_DTYPES:
            return getattr(torch, name)
        if self.stock_dcp and (module, name) == _STOCK_STORAGE_INFO:
            # DCP's own FileSystemWriter's per-item record (path, offset, length):
            # allowed only when reading a plain DCP directory (ckptstore.interop).
            from torch.distributed.checkpoint import filesystem

            return filesystem._StorageInfo
        if self.stock_dcp and module == "pathlib" and name in _PATHS:
            import pathlib  # StorageMeta.checkpoint_id, when dcp.save was given a Path

            return getattr(pathlib, name)
        if module == "torch.serialization" and name == "_get_layout":
            # Maps a name like "torch.strided" to the layout object: a dict lookup.
            return torch.serialization._get_layout
        raise UnsafeCheckpointError(
            f"{self.where}: refusing to unpickle {module}.{name}; a DCP .metadata never "
            "contains it, so this file was crafted or damaged. Do not load it."
        )

    where = ""
    stock_dcp = False


_STOCK_STORAGE_INFO = ("torch.distributed.checkpoint.filesystem", "_StorageInfo")
_PATHS = {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"}


def metadata_file(names: Iterable[str]) -> str | None:
    """Which of a manifest's file names is DCP's metadata (None: none, or several)."""
    found = [n for n in names if n == METADATA_FILE or _ATTEMPT_NAME.match(n)]
    return found[0] if len(found) == 1 else None


def metadata_index(fqn: str, offset: torch.Size) -> dcp_metadata.MetadataIndex:
    """``MetadataIndex(fqn, offset)`` without its copy of ``offset`` (already a
    ``torch.Size``): several times faster, and entries that share one offset object
    are pickled with one copy of it."""
    index = dcp_metadata.MetadataIndex.__new__(dcp_metadata.MetadataIndex)
    if type(offset) is not torch.Size:  # e.g. a list in a crafted .metadata
        offset = torch.Size(offset)
    index.__dict__.update(fqn=fqn, index=None, offset=offset)
    return index


def dumps(metadata: dcp_metadata.Metadata) -> bytes:
    return pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)


class MetadataCache:
    """The pickled ``.metadata`` of the last save (per part), reused while everything
    in it but ``storage_meta`` (the checkpoint's name and the save's id) is the same:
    saving the same state again pickles a few strings instead of an entry per tensor
    (0.55 s at 40,000 tensors).

    The cached bytes are the metadata pickled with ``storage_meta=None`` up to its last
    BUILD (protocol 3: no frames, so the stream can go on); each save appends the new
    ``storage_meta`` as a second BUILD, which any unpickler applies to the object's
    attributes like the first. Nothing else changes in the file.
    """

    def __init__(self) -> None:
        self._last: dict[Any, tuple[Any, bytes, str]] = {}
        self._hashed: dict[Any, tuple[str, Any]] = {}  # part -> (ident, xxh3 after body)

    def dumps(
        self,
        part: Any,
        key: Any,
        make: Callable[[], dcp_metadata.Metadata],
        storage_meta: Any,
    ) -> bytes:
        """The ``.metadata`` of ``make()`` with ``storage_meta`` set; ``make`` is called
        (and pickled) only if ``key`` differs from the last one for ``part``."""
        _, body, tail = self.dumps_split(part, key, make, storage_meta)
        return body + tail

    def dumps_split(
        self,
        part: Any,
        key: Any,
        make: Callable[[], dcp_metadata.Metadata],
        storage_meta: Any,
    ) -> tuple[str | None, bytes, bytes]:
        """:meth:`dumps` as ``(ident, body, tail)``: the file is ``body + tail``, and
        ``ident`` names ``body`` while it is reused (None: not cached, ``tail`` empty),
        so that a body once sent elsewhere need not be sent again."""
        last = self._last.get(part)
        if last is not None and last[0] == key:
            body, ident = last[1], last[2]
        else:
            self._last.pop(part, None)
            md = make()
            if not _builds_from_dict(type(md)):  # a second BUILD would not just add to it
                md.storage_meta = storage_meta
                return None, dumps(md), b""
            md.storage_meta = None
            data = pickle.dumps(md, protocol=3)
            if not data.endswith(b"b."):  # not a plain object + BUILD: pickle it whole
                md.storage_meta = storage_meta
                return None, dumps(md), b""
            body, ident = data[:-1], uuid.uuid4().hex
            self._last[part] = (key, body, ident)
        return ident, body, _build_tail({"storage_meta": storage_meta})

    def digest(self, part: Any, ident: str | None, body: bytes, tail: bytes) -> str:
        """The xxh3 of ``body + tail`` (``dumps_split``'s), hashing a reused body once:
        the hash state after it is kept per part while ``ident`` names it."""
        saved = self._hashed.get(part)
        if ident is not None and saved is not None and saved[0] == ident:
            h = saved[1].copy()
        else:
            h = xxhash.xxh3_64()
            h.update(body)
            if ident is not None:
                self._hashed[part] = (ident, h.copy())
        h.update(tail)
        return str(h.hexdigest())


def _builds_from_dict(cls: type) -> bool:
    """Whether pickle restores ``cls`` by updating its ``__dict__`` (object.__reduce_ex__,
    no __setstate__ or __slots__): then a second BUILD only sets the attributes it names.
    True for torch 2.13's Metadata, a plain dataclass."""
    own = ("__slots__", "__setstate__", "__getstate__", "__reduce__", "__reduce_ex__")
    return not any(name in klass.__dict__ for klass in cls.__mro__[:-1] for name in own)


def _build_tail(attrs: dict[str, Any]) -> bytes:
    """Opcodes that push ``attrs`` and BUILD them into the object below, then STOP."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=3)
    pickler.fast = True  # no memo: the cached part's memo entries are left alone
    pickler.dump(attrs)
    data = buf.getvalue()
    assert data[:2] == b"\x80\x03", data[:2]
    assert data[-1:] == b".", data[-1:]
    return data[2:-1] + b"b."


def loads(data: bytes, where: str, *, stock_dcp: bool = False) -> dcp_metadata.Metadata:
    """Unpickle DCP metadata through the allowlist. ``where`` names the file for errors;
    ``stock_dcp`` also allows the record DCP's own file-system writer keeps per item."""
    unpickler = _MetadataUnpickler(io.BytesIO(data))
    unpickler.where = where
    unpickler.stock_dcp = stock_dcp
    try:
        obj = unpickler.load()
    except UnsafeCheckpointError:
        raise
    except Exception as exc:
        raise CorruptCheckpointError(
            f"{where}: cannot read DCP metadata ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(obj, dcp_metadata.Metadata):
        raise CorruptCheckpointError(f"{where}: holds a {type(obj).__name__}, not DCP metadata")
    return obj
