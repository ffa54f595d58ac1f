"""Plain DCP checkpoint directories (as ``dcp.save`` with its ``FileSystemWriter``, and
so torchtitan, write them), both ways: ``ckptstore import DIR ROOT`` and ``ckptstore
export CKPT OUT --format dcp``.

Reading one is safe as ckptstore reads its own: DCP's ``.metadata`` pickle is unpickled
through ckptstore's allowlist of DCP's classes, and Python values through
``torch.load(weights_only=True)``; nothing in the directory can run code. A DCP
directory has no checksums: what it holds is taken as read, and the checkpoint made
from it gets them.
"""

from __future__ import annotations

import os
from typing import Any

from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from ckptstore.convert import restore_optimizer_keys
from ckptstore.dcp import metadata as md_format
from ckptstore.dcp.planner import SafeLoadPlanner
from ckptstore.errors import ExportError
from ckptstore.layout import MANIFEST_FILE, METADATA_FILE


def is_dcp_dir(path: str) -> bool:
    """A local directory that DCP wrote (``.metadata``, no ckptstore manifest)."""
    return (
        os.path.isdir(path)
        and os.path.isfile(os.path.join(path, METADATA_FILE))
        and not os.path.exists(os.path.join(path, MANIFEST_FILE))
    )


class _SafeReader(FileSystemReader):
    """DCP's file-system reader, with the metadata read through ckptstore's allowlist."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = os.path.join(str(self.path), METADATA_FILE)
        with open(path, "rb") as f:
            metadata = md_format.loads(f.read(), path, stock_dcp=True)
        storage_meta = getattr(metadata, "storage_meta", None)
        if storage_meta is not None:
            storage_meta.load_id = self.load_id
        return metadata


class _SafeEmptyPlanner(_EmptyStateDictLoadPlanner, SafeLoadPlanner):
    """Loads everything the checkpoint holds into an empty state dict; Python values
    with ``torch.load(weights_only=True)`` (SafeLoadPlanner's ``load_bytes``)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]


def read_dcp_dir(path: str) -> dict[str, Any]:
    """Everything a DCP directory holds, unsharded, on the CPU, nested as it was saved."""
    state: dict[str, Any] = {}
    _SafeReader(path).read_metadata()  # a crafted or damaged .metadata fails here, quietly
    try:
        # DCP's own route for this (format_utils.dcp_to_torch_save): the planner fills
        # ``state`` in place from the metadata, which the public dcp.load would not.
        _load_state_dict(
            state, storage_reader=_SafeReader(path), planner=_SafeEmptyPlanner(), no_dist=True
        )
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path} is not a readable DCP checkpoint: {exc}") from None
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        if type(exc).__name__ != "CheckpointException":
            raise
        raise ExportError(f"{path} is not a readable DCP checkpoint: {exc}") from None
    if not state:
        raise ExportError(f"{path} holds an empty DCP checkpoint: nothing to import")
    restore_optimizer_keys(state)
    return state


def why_not_replace(path: str) -> str | None:
    """Why ``path`` may not be replaced by a DCP directory even when told to (None: it
    may). Only a DCP directory or an empty one is: ``--force`` must not delete a
    directory of the user's other files, or a ckptstore checkpoint."""
    if not os.path.lexists(path):
        return None
    if os.path.islink(path) or not os.path.isdir(path):
        return "it is not a directory"
    names = os.listdir(path)
    if MANIFEST_FILE in names:
        return "it is a ckptstore checkpoint, not a plain DCP directory"
    others = sorted(n for n in names if n != METADATA_FILE and not n.endswith(".distcp"))
    if others or (names and METADATA_FILE not in names):
        shown = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
        return f"it holds files that are not a DCP checkpoint's ({shown or 'no .metadata'})"
    return None


def write_dcp_dir(state: dict[str, Any], path: str, *, overwrite: bool = False) -> None:
    """``state`` as a plain DCP directory at ``path`` (one process), readable by stock
    ``dcp.load`` with no ckptstore installed. Written beside, then renamed into place:
    ``path`` never holds half a checkpoint. ``overwrite`` replaces a DCP directory (or
    an empty one) there, nothing else (:func:`why_not_replace`: ``ExportError``)."""
    import shutil
    import uuid
    import warnings

    if os.path.lexists(path) and overwrite and (why := why_not_replace(path)) is not None:
        raise ExportError(f"not replacing {path}: {why}")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with warnings.catch_warnings():  # (that it runs in one process: it was asked to)
            warnings.filterwarnings("ignore", "torch.distributed is", UserWarning)
            dcp_save(state, storage_writer=FileSystemWriter(tmp), no_dist=True)
        if os.path.lexists(path):
            if not overwrite:
                raise FileExistsError(path)
            if (why := why_not_replace(path)) is not None:  # (changed meanwhile)
                raise ExportError(f"not replacing {path}: {why}")
            old = f"{tmp}.old"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
