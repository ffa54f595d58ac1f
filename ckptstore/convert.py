"""Checkpoints out of and into ckptstore as single files: ``torch.save`` and safetensors.

Export reads a checkpoint *unsharded* without the model's class: the target is built
from DCP's metadata alone (one ``torch.empty`` of the stored size and dtype per tensor,
a placeholder per Python value, nested as ``planner_data`` records), then loaded in
place by the ordinary, checksummed load path, which assembles every tensor from
however many ranks' shards it was saved in. This is what DCP's ``dcp_to_torch_save``
does, on ckptstore's verified reader and without unpickling anything outside
``torch.load(weights_only=True)``.

Two details of DCP's flattening that a plain round trip would lose:

* Keys become strings (``optim.state.0.exp_avg``): an optimizer's ``state`` dict,
  keyed by parameter index, comes back keyed ``"0"``, which ``Optimizer.load_state_dict``
  would silently ignore. A dict that holds ``state`` and ``param_groups`` (the shape of
  every ``torch.optim`` state dict) gets its integer keys back; nothing else is touched.
* Empty dicts and lists hold no keys, so they are not stored and do not come back.

Import is the reverse for files written by hand-rolled training code: a ``torch.save``
file (read with ``weights_only=True``: nothing in it can run code) or a safetensors
file becomes a committed checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from ckptstore.engine.ops import fill_from_checkpoint, load_into, read_dcp_metadata, read_manifest
from ckptstore.errors import ExportError, UnsupportedStateError
from ckptstore.format.manifest import Manifest
from ckptstore.storage import StorageBackend

# --dtype names and the dtypes they convert to. Only these "plain" floating dtypes are
# converted: fp8 tensors travel with scales of their own, complex and integer ones are
# not weights in a precision sense.
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp64": torch.float64,
    "float64": torch.float64,
}
CONVERTIBLE = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})

FORMATS = ("pt", "safetensors")
_SUFFIXES = {".pt": "pt", ".pth": "pt", ".bin": "pt", ".ckpt": "pt", ".safetensors": "safetensors"}


@dataclass
class Exported:
    """A checkpoint read back as plain Python, ready to write to one file."""

    obj: Any  # nested dicts/lists of tensors and values, or a flat dict of them
    keys: list[str]  # the checkpoint keys (DCP FQNs) that were read
    manifest: Manifest
    metadata: Metadata
    stripped: str | None  # the prefix removed from keys by ``only``


def file_format(path: str, explicit: str | None = None) -> str:
    """``pt`` or ``safetensors``, from ``explicit`` or the file name's suffix."""
    if explicit is not None:
        if explicit not in FORMATS:
            raise ExportError(f"unknown format {explicit!r}: use one of {', '.join(FORMATS)}")
        return explicit
    suffix = os.path.splitext(path.rstrip("/"))[1].lower()
    found = _SUFFIXES.get(suffix)
    if found is None:
        raise ExportError(
            f"cannot tell the format of {path!r} from its suffix: name it *.pt or "
            "*.safetensors, or pass --format pt|safetensors"
        )
    return found


def fqn(path: tuple[Any, ...]) -> str:
    """DCP's flattened key of a path (``("model", "wte.weight")`` -> ``model.wte.weight``)."""
    return ".".join(str(p) for p in path)


def under(key: str, prefix: str | None) -> bool:
    """Whether ``key`` is ``prefix`` or lies under it (at a ``.`` boundary)."""
    return prefix is None or key == prefix or key.startswith(prefix + ".")


def paths(metadata: Metadata) -> dict[str, tuple[Any, ...]]:
    """Every stored key and the path it had in the saved (nested) state dict."""
    planner_data = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    out: dict[str, tuple[Any, ...]] = {}
    for key in metadata.state_dict_metadata:
        path = planner_data.get(key)
        out[key] = path if isinstance(path, tuple) and path else tuple(key.split("."))
    return out


def read_checkpoint(
    backend: StorageBackend,
    name: str,
    *,
    only: str | None = None,
    keep_prefix: bool = False,
    pool: Executor | None = None,
    manifest_key: bytes | None = None,
) -> Exported:
    """Read checkpoint ``name`` into plain CPU tensors and values, unsharded.

    ``only``: keep the keys under this prefix (``model``, ``optim.state``,
    ``model.blocks.0``). The prefix is removed: when it names whole levels of the saved
    state dict (``model``) the result is that sub-dict as it was saved (a model's
    ``state_dict()``, loadable with ``load_state_dict``); when it ends inside a key
    (``model.blocks.0``) the result is a flat dict of the remaining key parts.
    ``keep_prefix`` keeps the full nesting instead.
    """
    manifest = read_manifest(backend, name, manifest_key=manifest_key)
    metadata = read_dcp_metadata(backend, name, manifest)
    where = paths(metadata)
    keys = sorted(k for k in where if under(k, only))
    if not keys:
        groups = sorted({str(p[0]) for p in where.values()})
        raise ExportError(
            f"{backend.url}/{name} has no key {only!r} or under it; its top-level entries are "
            f"{', '.join(groups) or 'none'} (ckptstore info lists every key)"
        )
    wanted = set(keys)
    target: dict[str, Any] = {}
    fill_from_checkpoint(target, metadata, lambda p: fqn(p) in wanted)
    load_into(target, backend, name, pool=pool, group=None, manifest_key=manifest_key)
    restore_optimizer_keys(target)
    if only is None or keep_prefix:
        return Exported(target, keys, manifest, metadata, None)
    return Exported(_strip(target, only, keys, where), keys, manifest, metadata, only)


def _strip(target: dict[str, Any], only: str, keys: list[str], where: dict[str, Any]) -> Any:
    # Does ``only`` name whole path levels, the same ones for every selected key?
    levels: set[tuple[Any, ...] | None] = set()
    for key in keys:
        path = where[key]
        k = next((i for i in range(1, len(path) + 1) if fqn(path[:i]) == only), None)
        levels.add(None if k is None else path[:k])
    if len(levels) == 1 and None not in levels:
        (level,) = levels
        node: Any = target
        for part in level or ():
            node = node[part]
        if isinstance(node, (dict, list)):
            return node
        return {only: node}  # ``only`` names a single entry: keep its full key
    # It ends inside a key: a flat dict of what follows the prefix.
    flat: dict[str, Any] = {}
    for key in keys:
        node = target
        for part in where[key]:
            node = node[part]
        flat[key[len(only) + 1 :] if key != only else key] = node
    return flat


def restore_optimizer_keys(obj: Any) -> None:
    """Give a ``torch.optim`` state dict's ``state`` its integer keys back, in place.

    DCP stores ``state[0]`` as ``state.0``; loading brings back ``"0"``, which
    ``Optimizer.load_state_dict`` would not match to any parameter. Only a dict that
    holds both ``state`` and ``param_groups`` whose ``params`` are integers (the shape of
    every torch optimizer's state dict), and whose string keys all name one of those
    integers, is changed.
    """
    if isinstance(obj, list):
        for v in obj:
            restore_optimizer_keys(v)
        return
    if not isinstance(obj, dict):
        return
    state, groups = obj.get("state"), obj.get("param_groups")
    if isinstance(state, dict) and isinstance(groups, list):
        ids = {
            p
            for g in groups
            if isinstance(g, dict) and isinstance(g.get("params"), list)
            for p in g["params"]
            if isinstance(p, int)
        }
        if state and all(isinstance(k, str) and k.isdigit() and int(k) in ids for k in state):
            obj["state"] = {int(k): v for k, v in state.items()}
    for v in obj.values():
        restore_optimizer_keys(v)


def convert_dtype(obj: Any, dtype: torch.dtype) -> tuple[Any, int]:
    """``obj`` with every bf16/fp16/fp32/fp64 tensor cast to ``dtype``; and how many."""
    count = 0

    def walk(x: Any) -> Any:
        nonlocal count
        if isinstance(x, torch.Tensor):
            if x.dtype in CONVERTIBLE and x.dtype != dtype:
                count += 1
                return x.to(dtype)
            return x
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, tuple):
            return tuple(walk(v) for v in x)
        return x

    return walk(obj), count


def flat_tensors(obj: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors of a nested object under dotted keys; and the keys of non-tensor values."""
    tensors: dict[str, torch.Tensor] = {}
    values: list[str] = []

    def walk(x: Any, prefix: str) -> None:
        if isinstance(x, torch.Tensor):
            tensors[prefix] = x
        elif isinstance(x, dict) and x:
            for k, v in x.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(x, (list, tuple)) and any(_has_tensor(v) for v in x):
            for i, v in enumerate(x):
                walk(v, f"{prefix}.{i}" if prefix else str(i))
        else:
            values.append(prefix or "(the whole object)")

    walk(obj, "")
    return tensors, values


def _has_tensor(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, dict):
        return any(_has_tensor(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(_has_tensor(v) for v in x)
    return False


def for_safetensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors safetensors accepts: contiguous, each owning its memory.

    safetensors refuses tensors that share storage (tied weights, such as an embedding
    and an output layer) and non-contiguous ones. Shared ones are cloned, so every key
    stays in the file and loads as it was saved (an inference stack that re-ties
    weights reads either copy).
    """
    import safetensors.torch as st

    supported = getattr(st, "_TYPES", None)
    if isinstance(supported, dict):
        bad = [f"{k} ({t.dtype})" for k, t in tensors.items() if t.dtype not in supported.values()]
        if bad:
            raise ExportError(
                f"safetensors cannot store {len(bad)} tensor(s): {', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''}; export to a .pt file, or leave them out with --only"
            )
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in tensors.items():
        t = t.detach().cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
            else:
                seen.add(ptr)
        out[key] = t
    return out


def output_exists(path: str) -> bool:
    """Whether ``path`` (a local path or an fsspec URL) exists already."""
    if "://" in path and not path.startswith("file://"):
        import fsspec

        fs, remote = fsspec.core.url_to_fs(path)
        return bool(fs.exists(remote))
    return os.path.exists(os.path.expanduser(path.removeprefix("file://")))


@contextlib.contextmanager
def local_output(path: str, *, overwrite: bool) -> Iterator[str]:
    """A temporary local file to write; on success it becomes ``path`` at once.

    ``path`` may be an fsspec URL (``s3://...``): the file is uploaded when complete.
    A failed export leaves nothing at ``path``.
    """
    if "://" in path and not path.startswith("file://"):
        import fsspec

        fs, remote = fsspec.core.url_to_fs(path)
        if not overwrite and fs.exists(remote):
            raise FileExistsError(path)
        with tempfile.TemporaryDirectory(prefix="ckptstore-export-") as tmp:
            local = os.path.join(tmp, os.path.basename(remote) or "export")
            yield local
            fs.put_file(local, remote)
        return
    path = path.removeprefix("file://")
    path = os.path.abspath(os.path.expanduser(path))
    if not overwrite and os.path.exists(path):
        raise FileExistsError(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # as a file opened for writing would be, not 0600
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)


@contextlib.contextmanager
def local_input(path: str) -> Iterator[str]:
    """``path`` as a local file to read (an fsspec URL is downloaded first)."""
    if "://" in path and not path.startswith("file://"):
        import fsspec

        fs, remote = fsspec.core.url_to_fs(path)
        if not fs.exists(remote):
            raise FileNotFoundError(path)
        with tempfile.TemporaryDirectory(prefix="ckptstore-import-") as tmp:
            local = os.path.join(tmp, os.path.basename(remote) or "import")
            fs.get_file(remote, local)
            yield local
        return
    path = os.path.abspath(os.path.expanduser(path.removeprefix("file://")))
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    yield path


def write_file(obj: Any, local_path: str, fmt: str, metadata: dict[str, str]) -> int:
    """Write ``obj`` to ``local_path`` as ``fmt``; return how many tensors it holds.

    safetensors holds tensors only: non-tensor values are left out (listed in the
    :class:`ExportError` if nothing else is left).
    """
    if fmt == "pt":
        torch.save(obj, local_path)
        return len(flat_tensors(obj)[0])
    try:
        import safetensors.torch as st
    except ImportError:
        raise ExportError(
            "writing .safetensors needs the safetensors package: pip install safetensors "
            "(or export to a .pt file)"
        ) from None
    tensors, _ = flat_tensors(obj)
    if not tensors:
        raise ExportError(
            "nothing to write: the selection holds no tensors (only Python values); choose "
            "another --only, or export to a .pt file"
        )
    st.save_file(for_safetensors(tensors), local_path, metadata=metadata)
    return len(tensors)


def read_file(
    local_path: str, fmt: str, shown: str | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """A ``torch.save`` or safetensors file as a state dict; and the file's own metadata.

    ``shown`` names the file in messages (the URL it was downloaded from).
    """
    shown = shown or local_path
    if fmt == "safetensors":
        try:
            from safetensors import safe_open
        except ImportError:
            raise ExportError(
                "reading .safetensors needs the safetensors package: pip install safetensors"
            ) from None
        out: dict[str, Any] = {}
        try:
            with safe_open(local_path, framework="pt") as f:
                header = dict(f.metadata() or {})
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    out[key] = f.get_tensor(key)
        except Exception as exc:
            raise ExportError(
                f"{shown} is not a readable safetensors file ({type(exc).__name__}: {exc}); "
                "check that it is the file you meant, or pass --format pt"
            ) from None
        return out, header
    import pickle

    try:
        obj = _torch_load(local_path)
    except pickle.UnpicklingError as exc:
        import re

        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        first = (
            f"{found.group(1)} is not an allowed type"
            if found
            else (str(exc).strip().splitlines() or [""])[0]
        )
        raise ExportError(
            f"{shown} holds objects that torch.load(weights_only=True) refuses ({first}); "
            "ckptstore never unpickles arbitrary code: re-save it with plain tensors, numbers, "
            "strings, lists and dicts (for example torch.save(model.state_dict(), path))"
        ) from None
    except Exception as exc:
        raise ExportError(
            f"{shown} is not a readable torch.save file ({type(exc).__name__}: {exc}); check "
            "that it is the file you meant, or pass --format safetensors"
        ) from None
    if not isinstance(obj, dict) or not obj:
        raise ExportError(
            f"{shown} holds a {type(obj).__name__}, not a non-empty dict: ckptstore "
            "imports state dicts (for a bare tensor, save {'name': tensor} instead)"
        )
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise UnsupportedStateError(
            f"{shown}: top-level keys must be strings, found {bad[:3]!r}; wrap the "
            "state as {'model': ...} and save it again"
        )
    return obj, {}


def _torch_load(path: str) -> Any:
    """``torch.load`` with ``weights_only=True``, memory-mapped where the file allows it
    (the zip format): tensors are then read as the checkpoint is written, not all first."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
    return torch.load(path, map_location="cpu", weights_only=True)


def stored_nbytes(md: TensorStorageMetadata) -> int:
    """The bytes a stored tensor takes unsharded."""
    numel = 1
    for n in md.size:
        numel *= int(n)
    return numel * torch.empty((), dtype=md.properties.dtype).element_size()
