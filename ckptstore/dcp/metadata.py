"""DCP's ``.metadata``: pickled by DCP's own classes, unpickled only through an allowlist.

DCP stores its checkpoint metadata as a raw pickle, and ``dcp.load`` unpickles it with
``pickle.load``: a crafted ``.metadata`` runs code in the loading process. ckptstore
keeps the pickle (the metadata objects are DCP's, and DCP's planners need them) but:

1. reads its own checkpoints' ``.metadata`` only once its size and checksum match
   the manifest (with CPython's C unpickler; a plain DCP directory's, which nothing
   vouches for, with the pure-Python one: :func:`loads`), and
2. unpickles it through :class:`_Allowlist`, which resolves only the handful of
   globals a DCP ``Metadata`` is made of (listed below, found by pickling real
   metadata of every kind of state); anything else raises
   :class:`~ckptstore.errors.UnsafeCheckpointError` before it is touched.

The checksum guards against corruption, the allowlist against a hostile file: an
attacker who can write ``.metadata`` can rewrite the manifest too. The allowlist bounds
what a file can call, not what unpickling it costs: a crafted pickle can still take
time or memory out of proportion to its size (a memo index on the C unpickler: up to
tens of GB; repeated BUILDs of a large dict, or many empty sets, on either), which a
manifest key (refusing a rewritten manifest before anything else is read) prevents for
ckptstore's own checkpoints.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import pickletools
import re
import struct
import uuid
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

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


class _Allowlist:
    """``find_class`` for DCP metadata: only the classes a ``.metadata`` holds."""

    where = ""
    stock_dcp = False

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


class _MetadataUnpickler(_Allowlist, pickle.Unpickler):
    """The C unpickler: for bytes whose checksum matched the manifest's."""


class _UncheckedMetadataUnpickler(_Allowlist, pickle._Unpickler):
    """The pure-Python unpickler, for bytes nothing vouches for (a plain DCP directory).
    Its memo is a dict: the C unpickler grows an array to the largest index a memo
    opcode names, so 5 bytes (LONG_BINPUT 0x47e57000) made it zero ~19 GB for ~40 s
    here (found by tests/test_fuzz.py), where this one stores one entry."""


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
    attributes like the first. Nothing else changes in the file, but in a node-local
    part's (:meth:`dumps_part`), whose head before that BUILD sets its own entries.
    """

    def __init__(self) -> None:
        self._last: dict[Any, tuple[Any, bytes, str, int | None]] = {}
        self._heads: dict[Any, tuple[str, dict[Any, Any], str, bytes]] = {}  # parts' heads
        self._hashed: dict[Any, tuple[str, Any]] = {}  # part -> (ident, xxh3 up to tail)

    def dumps(
        self,
        part: Any,
        key: Any,
        make: Callable[[], dcp_metadata.Metadata],
        storage_meta: Any,
    ) -> bytes:
        """The ``.metadata`` of ``make()`` with ``storage_meta`` set; ``make`` is called
        (and pickled) only if ``key`` differs from the last one for ``part``."""
        pp = self.dumps_split(part, key, make, storage_meta)
        return pp.body + pp.tail

    def dumps_split(
        self,
        part: Any,
        key: Any,
        make: Callable[[], dcp_metadata.Metadata],
        storage_meta: Any,
    ) -> PartPickle:
        """:meth:`dumps` as a :class:`PartPickle` without a head: ``ident`` names the
        body while it is reused (None: not cached, the tail empty), so that a body once
        sent elsewhere need not be sent again."""
        got = self._body(part, key, make, table_first=False)
        if isinstance(got, dcp_metadata.Metadata):
            return PartPickle(None, dumps(_whole(got, None, storage_meta)), None, b"", b"")
        body, ident, _ = got
        return PartPickle(None, body, ident, b"", _build_tail({"storage_meta": storage_meta}))

    def dumps_part(
        self,
        key: Any,
        make: Callable[[], dcp_metadata.Metadata],
        storage_meta: Any,
        part: Any,
        patch: dict[Any, Any],
    ) -> PartPickle:
        """One node-local part's ``.metadata``: the body every part shares (``make()``,
        pickled once while ``key`` holds), this part's ``head`` (opcodes that set
        ``patch``'s entries in the item table: its own copies of replicated items; kept
        while the body and ``patch`` are the same) and the ``storage_meta`` tail."""
        got = self._body(_SHARED, key, make, table_first=True)
        if isinstance(got, dcp_metadata.Metadata):  # each part pickled whole
            return PartPickle(None, dumps(_whole(got, patch, storage_meta)), None, b"", b"")
        body, shared, table = got
        held = self._heads.get(part)
        if held is not None and held[0] == shared and (held[1] is patch or held[1] == patch):
            ident, head = held[2], held[3]
        else:
            head = _patch_ops(table, patch) if patch else b""
            ident = uuid.uuid4().hex
            self._heads[part] = (shared, patch, ident, head)
        return PartPickle(shared, body, ident, head, _build_tail({"storage_meta": storage_meta}))

    def _body(
        self, slot: Any, key: Any, make: Callable[[], dcp_metadata.Metadata], table_first: bool
    ) -> tuple[bytes, str, int | None] | dcp_metadata.Metadata:
        """The body kept in ``slot`` while ``key`` holds (with its ident and its item
        table's memo slot), else ``make()`` pickled and kept; the made metadata itself
        where it cannot be continued by a tail (then it is pickled whole)."""
        last = self._last.get(slot)
        if last is not None and last[0] == key:
            return last[1], last[2], last[3]
        self._last.pop(slot, None)
        md = make()
        split = _split_body(md, table_first)
        if split is None:
            return md
        body, table = split
        ident = uuid.uuid4().hex
        self._last[slot] = (key, body, ident, table)
        return body, ident, table

    def keep_parts(self, parts: list[Any]) -> None:
        """Forget the heads and hash states of parts not in ``parts`` (disks gone)."""
        for kept in (self._heads, self._hashed):
            for part in [p for p in kept if p not in parts and p != _SHARED]:
                del kept[part]

    def digest_part(self, part: Any, pp: PartPickle) -> str:
        """The xxh3 of ``pp``'s file; the hash states after the shared body and after
        this part's head are kept while their idents name them."""
        saved = self._hashed.get(part)
        if pp.ident is not None and saved is not None and saved[0] == pp.ident:
            h = saved[1].copy()
        else:
            base = self._hashed.get(_SHARED)
            if pp.shared is not None and base is not None and base[0] == pp.shared:
                h = base[1].copy()
            else:
                h = xxhash.xxh3_64()
                h.update(pp.body)
                if pp.shared is not None:
                    self._hashed[_SHARED] = (pp.shared, h.copy())
            h.update(pp.head)
            if pp.ident is not None:
                self._hashed[part] = (pp.ident, h.copy())
        h.update(pp.tail)
        return str(h.hexdigest())


class PartPickle(NamedTuple):
    """A node-local part's ``.metadata``: ``body + head + tail``. ``shared`` names the
    body all parts share, ``ident`` body and head (None: not cached)."""

    shared: str | None
    body: bytes
    ident: str | None
    head: bytes
    tail: bytes


_SHARED = ("the body node-local parts share",)


def _split_body(md: dcp_metadata.Metadata, table_first: bool) -> tuple[bytes, int | None] | None:
    """``md`` pickled without ``storage_meta`` and its STOP, to be followed by a tail;
    with ``table_first``, also the memo slot of its item table (for a part's head).
    None where the pickle cannot be continued so (then pickle it whole)."""
    if not _builds_from_dict(type(md)):  # a second BUILD would not just add to it
        return None
    md.storage_meta = None
    if table_first:  # the table first, for a head to find its memo slot
        attrs = md.__dict__
        md.__dict__ = {"storage_data": attrs.pop("storage_data"), **attrs}
    data = pickle.dumps(md, protocol=3)
    if not data.endswith(b"b."):  # not a plain object + BUILD
        return None
    table = _table_slot(data) if table_first else None
    if table_first and table is None:
        return None
    return data[:-1], table


def _builds_from_dict(cls: type) -> bool:
    """Whether pickle restores ``cls`` by updating its ``__dict__`` (object.__reduce_ex__,
    no __setstate__ or __slots__): then a second BUILD only sets the attributes it names.
    True for torch 2.13's Metadata, a plain dataclass."""
    own = ("__slots__", "__setstate__", "__getstate__", "__reduce__", "__reduce_ex__")
    return not any(name in klass.__dict__ for klass in cls.__mro__[:-1] for name in own)


def _whole(
    md: dcp_metadata.Metadata, patch: dict[Any, Any] | None, storage_meta: Any
) -> dcp_metadata.Metadata:
    if patch:
        md.storage_data = {**md.storage_data, **patch}
    md.storage_meta = storage_meta
    return md


def _table_slot(data: bytes) -> int | None:
    """The memo slot of the item table in ``data`` (pickled with ``storage_data`` as
    the first attribute, so it starts within the first few opcodes)."""
    key = table = False  # just past the "storage_data" key; past the dict after it
    with contextlib.suppress(ValueError):  # the prefix ends mid-opcode
        for op, arg, _ in pickletools.genops(io.BytesIO(data[:512])):
            if op.name.endswith("PUT"):  # memoizes the object just pushed
                if table:
                    return int(arg)  # type: ignore[arg-type]
                continue
            table = key and op.name == "EMPTY_DICT"
            key = op.name.endswith("UNICODE") and arg == "storage_data"
    return None  # not where it was put


def _patch_ops(table: int | None, patch: dict[Any, Any]) -> bytes:
    """Opcodes that fetch the item table from the memo (slot ``table``), set
    ``patch``'s entries in it and pop it again, leaving the stack as it was."""
    assert table is not None
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=3)
    pickler.fast = True  # no memo: the body's memo entries are left alone
    pickler.dump(patch)
    data = buf.getvalue()
    assert data[:3] == b"\x80\x03}", data[:3]
    assert data[-1:] == b".", data[-1:]
    # LONG_BINGET the table; the dict's MARK ... SETITEMS batches; POP
    return b"j" + struct.pack("<I", table) + data[3:-1] + b"0"


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


def loads(
    data: bytes, where: str, *, stock_dcp: bool = False, checked: bool = False
) -> dcp_metadata.Metadata:
    """Unpickle DCP metadata through the allowlist. ``where`` names the file for errors;
    ``stock_dcp`` also allows the record DCP's own file-system writer keeps per item;
    ``checked``: ``data``'s size and checksum matched its manifest (the fast C
    unpickler; otherwise the pure-Python one, whose memo a damaged index cannot blow
    up: :class:`_UncheckedMetadataUnpickler`; other crafted patterns: module doc)."""
    cls = _MetadataUnpickler if checked else _UncheckedMetadataUnpickler
    unpickler = cls(io.BytesIO(data))
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
