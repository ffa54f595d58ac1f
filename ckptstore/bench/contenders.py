"""What ``ckptstore bench`` compares: each contender saves the same state its own way.

A contender's ``save(run)`` writes one checkpoint and returns when it is durable (on
disk and fsynced, or acknowledged by the object store), with ``stall_s`` (how long the
call blocked its caller) and ``staged_s`` (when the caller may change its tensors again)
measured inside; the suite measures the rest around it. ``load(path)`` reads it back.

A contender that cannot run here (a package not installed, a torch too old, a local-only
writer on an object store) is built as a :class:`Skipped` with the reason, so the suite
lists it instead of dropping it.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
import torch.distributed.checkpoint as dcp

import ckptstore
from ckptstore.bench.common import du, rm
from ckptstore.layout import checkpoint_name

SaveFn = Callable[[int], tuple[dict[str, float], str]]


@dataclass
class Contender:
    name: str
    what: str
    save: SaveFn | None
    load: Callable[[str], Any] | None = None
    load_into: str = "the live state"
    weights_only: bool = False
    raw_bytes: int | None = None  # what it saves, if not the whole state
    close: Callable[[], None] = lambda: None


@dataclass
class Skipped:
    name: str
    reason: str


@dataclass
class Target:
    """Where checkpoints go: a local directory or an fsspec URL (``s3://bucket/prefix``)."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fs, self.base = fsspec.core.url_to_fs(self.url, **self.storage_options)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = "file" in protocols
        if self.local:
            self.url = os.path.abspath(self.base)

    def join(self, name: str) -> str:
        return self.url.rstrip("/") + "/" + name

    def size(self, path: str) -> int:
        return du(path) if self.local else int(self.fs.du(path, total=True))

    def remove(self, path: str) -> None:
        if self.local:
            rm(path)
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)
        self.fs.invalidate_cache()


def tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


NAMES = (
    "copy_prealloc",
    "torch_save",
    "safetensors",
    "s3fs_raw",
    "dcp_save",
    "dcp_zstd",
    "dcp_async_default",
    "dcp_async_reused",
    "ckptstore_none",
    "ckptstore_zstd",
    "ckptstore_auto",
)


def check_names(names: list[str]) -> None:
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ValueError(
            f"unknown contender(s) {', '.join(unknown)}; choose from: {', '.join(NAMES)}"
        )


def build(
    state: dict[str, Any],
    target: Target,
    *,
    threads: int | None,
    names: list[str] | None = None,
) -> list[Contender | Skipped]:
    """Every contender for this state and target, in a fixed order (``names``: a subset)."""
    makers: dict[str, Callable[[], Contender | Skipped]] = {
        "copy_prealloc": lambda: _copy_prealloc(state),
        "torch_save": lambda: _torch_save(state, target),
        "safetensors": lambda: _safetensors(state, target),
        "s3fs_raw": lambda: _s3fs_raw(state, target),
        "dcp_save": lambda: _dcp_save(state, target, "dcp_save"),
        "dcp_zstd": lambda: _dcp_save(state, target, "dcp_zstd", zstd=True),
        "dcp_async_default": lambda: _dcp_async(state, target, reuse=False),
        "dcp_async_reused": lambda: _dcp_async(state, target, reuse=True),
        **{
            f"ckptstore_{codec}": (
                lambda codec=codec: _ckptstore(state, target, codec, threads)  # type: ignore[misc]
            )
            for codec in ("none", "zstd", "auto")
        },
    }
    assert tuple(makers) == NAMES
    if names is not None:
        check_names(names)
    out: list[Contender | Skipped] = []
    for name, make in makers.items():
        if names is not None and name not in names:
            continue
        try:
            out.append(make())
        except ImportError as exc:
            out.append(Skipped(name, f"not installed: {exc}"))
    return out


def _copy_prealloc(state: dict[str, Any]) -> Contender:
    prealloc = [t.detach().clone() for t in tensors(state)]

    def save(r: int) -> tuple[dict[str, float], str]:
        with torch.no_grad():
            t = _timed(lambda: [d.copy_(s) for d, s in zip(prealloc, tensors(state), strict=True)])
        return {"stall_s": t, "staged_s": t}, ""

    return Contender(
        "copy_prealloc",
        "reference: one copy into preallocated host memory (the floor for any stall)",
        save,
    )


def _torch_save(state: dict[str, Any], target: Target) -> Contender:
    def save(r: int) -> tuple[dict[str, float], str]:
        path = target.join(f"torch_save-{r}.pt")
        if target.local:
            stall = _timed(lambda: torch.save(state, path))
            _fsync(path)
        else:
            with target.fs.open(path, "wb") as f:
                stall = _timed(lambda: torch.save(state, f))
        return {"stall_s": stall, "staged_s": stall}, path

    def load(path: str) -> Any:
        if target.local:
            return torch.load(path, weights_only=True, map_location="cpu")
        with target.fs.open(path, "rb") as f:
            return torch.load(f, weights_only=True, map_location="cpu")

    return Contender(
        "torch_save",
        "torch.save to one file (+fsync)" if target.local else "torch.save into an s3fs file",
        save,
        load,
        load_into="new tensors",
    )


def _weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's tensors, each storage once (safetensors refuses shared tensors)."""
    seen: set[int] = set()
    out = {}
    for k, v in state["model"].items():
        if isinstance(v, torch.Tensor) and v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            out[k] = v.contiguous()
    return out


def _safetensors(state: dict[str, Any], target: Target) -> Contender | Skipped:
    from safetensors.torch import load_file, save_file

    if not target.local:
        return Skipped("safetensors", "writes local files only")
    if "model" not in state:
        return Skipped("safetensors", "the state has no 'model' part")
    live = _weights(state)

    def save(r: int) -> tuple[dict[str, float], str]:
        path = target.join(f"safetensors-{r}.safetensors")
        stall = _timed(lambda: save_file(_weights(state), path))
        _fsync(path)
        return {"stall_s": stall, "staged_s": stall}, path

    def load(path: str) -> None:
        # load_file maps the file lazily; copying into the live weights reads it all,
        # as model.load_state_dict would.
        with torch.no_grad():
            for k, v in load_file(path).items():
                live[k].copy_(v)

    return Contender(
        "safetensors",
        "safetensors save_file of the weights only (+fsync); no optimizer state",
        save,
        load,
        weights_only=True,
        raw_bytes=sum(t.numel() * t.element_size() for t in live.values()),
    )


def _s3fs_raw(state: dict[str, Any], target: Target) -> Contender | Skipped:
    if target.local:
        return Skipped("s3fs_raw", "object stores only: the raw upload baseline")
    buf = io.BytesIO()
    torch.save(state, buf)
    blob = buf.getvalue()

    def save(r: int) -> tuple[dict[str, float], str]:
        path = target.join(f"s3fs_raw-{r}.bin")
        stall = _timed(lambda: target.fs.pipe_file(path, blob))
        return {"stall_s": stall, "staged_s": stall}, path

    return Contender(
        "s3fs_raw",
        "raw s3fs: one pipe_file / cat_file of pre-serialized bytes (transport only)",
        save,
        lambda path: target.fs.cat_file(path),
        load_into="a bytes object",
    )


def _dcp_save(
    state: dict[str, Any], target: Target, name: str, zstd: bool = False
) -> Contender | Skipped:
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    ext: list[Any] = []
    if zstd:
        from torch.distributed.checkpoint._extension import ZStandard

        if not target.local:
            return Skipped(name, "measured on local disk only")
        ext = [ZStandard()]

    def writer(path: str) -> Any:
        if target.local:
            return FileSystemWriter(path, thread_count=2, _extensions=ext or None)
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(path, thread_count=2, **target.storage_options)

    def reader(path: str) -> Any:
        if target.local:
            return FileSystemReader(path)
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(path, **target.storage_options)

    def save(r: int) -> tuple[dict[str, float], str]:
        path = target.join(f"{name}-{r}")
        t = _timed(lambda: dcp.save(state, storage_writer=writer(path)))
        return {"stall_s": t, "staged_s": t}, path

    what = "DCP save (FileSystemWriter, 2 threads)" if target.local else "DCP save (FsspecWriter)"
    if zstd:
        what = "DCP save with its experimental ZStandard extension"
    return Contender(name, what, save, lambda path: dcp.load(state, storage_reader=reader(path)))


def dcp_async_save(state: dict[str, Any], path: str, stager: Any) -> tuple[float, float]:
    """``dcp.async_save`` until durable; returns (call blocked, state reusable) seconds."""
    t0 = time.perf_counter()
    resp = dcp.async_save(state, checkpoint_id=path, async_stager=stager)
    stall = time.perf_counter() - t0
    if hasattr(resp, "staging_completion"):  # with a stager: staging and upload apart
        resp.staging_completion.result()
        staged = time.perf_counter() - t0
        resp.upload_completion.result()
    else:
        staged = stall
        resp.result()
    return stall, staged


def _dcp_async(state: dict[str, Any], target: Target, reuse: bool) -> Contender | Skipped:
    import inspect

    name = "dcp_async_reused" if reuse else "dcp_async_default"
    if not target.local:
        return Skipped(name, "measured on local disk only")
    if "async_stager" not in inspect.signature(dcp.async_save).parameters:
        return Skipped(name, f"torch {torch.__version__} has no async_stager")
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    stager = DefaultStager(StagingOptions(False, False, False, False)) if reuse else None

    def save(r: int) -> tuple[dict[str, float], str]:
        path = target.join(f"{name}-{r}")
        gc.collect()
        stall, staged = dcp_async_save(state, path, stager)
        return {"stall_s": stall, "staged_s": staged}, path

    what = (
        "DCP async_save, one DefaultStager reused (buffers kept between saves)"
        if reuse
        else "DCP async_save, default stager (new buffers per save)"
    )
    return Contender(
        name,
        what,
        save,
        lambda path: dcp.load(state, storage_reader=FileSystemReader(path)),
        close=stager.close if stager is not None else (lambda: None),
    )


def _ckptstore(state: dict[str, Any], target: Target, codec: str, threads: int | None) -> Contender:
    name = f"ckptstore_{codec}"
    root = target.join(name)
    ck = ckptstore.Checkpointer(
        root, codec=codec, threads=threads, storage_options=target.storage_options or None
    )

    def save(r: int) -> tuple[dict[str, float], str]:
        step = r + 2  # the warm-up is run -1
        t0 = time.perf_counter()
        pending = ck.save_async(state, step, block_until_staged=True)
        stall = time.perf_counter() - t0
        pending.staged.result()
        staged = time.perf_counter() - t0
        pending.wait()
        return {"stall_s": stall, "staged_s": staged}, root.rstrip("/") + "/" + checkpoint_name(
            step
        )

    def load(path: str) -> Any:
        return ckptstore.load(
            state, path, threads=threads, storage_options=target.storage_options or None
        )

    what = {
        "none": "ckptstore, uncompressed, background write",
        "zstd": "ckptstore, zstd, background write",
        "auto": "ckptstore, codec=auto (the default), background write",
    }[codec]
    return Contender(name, what, save, load, close=ck.close)
