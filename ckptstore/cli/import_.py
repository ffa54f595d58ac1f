"""``ckptstore import``: a torch.save (.pt) or safetensors file brought in as a committed
checkpoint.

The file is read with ``torch.load(weights_only=True)``; an existing step is never
overwritten, and the ``latest`` pointer moves only if the new checkpoint is the newest.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Any

import ckptstore
from ckptstore.cli._common import (
    OK,
    int_at_least,
    is_url,
    local_path,
    manifest_key,
    open_root,
    size,
    status,
    usage_error,
    usage_errors,
    writer_lease,
)
from ckptstore.engine.listing import list_checkpoints
from ckptstore.errors import CheckpointExistsError, CkptStoreError, CliError, ExportError
from ckptstore.layout import MANIFEST_FILE, MAX_STEP, checkpoint_name
from ckptstore.manager import pointer
from ckptstore.storage import StorageBackend

EXAMPLES = (
    "  ckptstore import old/checkpoint_epoch3.pt runs/exp1 --step 3000\n"
    "  ckptstore import out/ckpt.pt runs/nano      # nanoGPT's: its iter_num is the step\n"
    "  ckptstore import model.safetensors s3://my-bucket/models/gpt\n"
    "  ckptstore import outputs/checkpoint/step-1000 runs/titan   # a DCP directory\n\n"
    "The file is read with torch.load(weights_only=True): tensors, numbers,\n"
    "strings, lists and dicts, nothing that runs code. It must hold a dict (a\n"
    "state_dict, or {'model': ..., 'optimizer': ..., 'epoch': ...}). An existing\n"
    "step is never overwritten. Files laid out as {'model_state_dict', \n"
    "'optimizer_state_dict', 'scheduler_state_dict', 'epoch', ...} or as nanoGPT's\n"
    "{'model', 'optimizer', 'iter_num', ...} resume a TrainState afterwards:\n"
    "CheckpointManager(ROOT).restore(state) puts each part where it belongs."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE")
    p.add_argument("root", metavar="ROOT")
    p.add_argument(
        "--step",
        type=int_at_least(0),
        default=None,
        metavar="N",
        help="default: the file's iter_num, global_step or step (a TrainState's "
        "counters.step), else 0",
    )
    p.add_argument("--codec", choices=("auto", "none", "zstd"), default="auto")
    p.add_argument("--format", choices=("pt", "safetensors"), help="default: from the suffix")


def run(args: argparse.Namespace) -> int:
    # torch: imported when the command runs, not for its --help or a usage error
    from ckptstore.convert import file_format

    dcp_dir = not is_url(args.file) and os.path.isdir(local_path(args.file))
    if dcp_dir:
        from ckptstore.interop import is_dcp_dir

        if not is_dcp_dir(local_path(args.file)):
            raise usage_error(
                f"{args.file} is a directory but not a DCP checkpoint (no .metadata, or a "
                "ckptstore checkpoint already): give a .pt / .safetensors file or a "
                "directory dcp.save wrote"
            )
        fmt = "dcp"
        if not is_url(args.root):
            src, dst = (os.path.realpath(local_path(p)) for p in (args.file, args.root))
            if dst == src or dst.startswith(src + os.sep):
                raise usage_error(
                    f"ROOT {args.root} is the DCP directory itself or inside it: its "
                    "checkpoints would be written among the DCP files; give another ROOT"
                )
    else:
        with usage_errors(ExportError):
            fmt = file_format(args.file, args.format)
    if not dcp_dir and not is_url(args.file) and not os.path.isfile(local_path(args.file)):
        raise usage_error(f"{args.file}: no such file; check the path")
    backend = open_root(args.root, create=True)
    with writer_lease(backend, "stop that run first, or import into another directory"):
        return _import(args, backend, fmt, dcp_dir)


def _import(args: argparse.Namespace, backend: StorageBackend, fmt: str, dcp_dir: bool) -> int:
    from ckptstore.convert import flat_tensors, local_input

    metadata: dict[str, Any] = {
        "imported_from": os.path.basename(args.file.rstrip("/")),
        "imported_format": {"pt": "torch.save", "dcp": "dcp"}.get(fmt, "safetensors"),
    }
    start = time.monotonic()
    try:
        with (
            contextlib.nullcontext(local_path(args.file))
            if dcp_dir
            else local_input(args.file) as local
        ):
            state: dict[str, Any] | None = None
            if args.step is None:  # the file's own step counter, read first
                status(f"reading {args.file}")
                state, header = read_any(local, fmt, args.file)
                args.step = step_in(state, header)
            # The destination before a large file is read: a taken step fails at once.
            existing = check_free(backend, args.step)
            if state is None:
                status(f"reading {args.file}")
                state, header = read_any(local, fmt, args.file)
            if header:
                metadata["safetensors_metadata"] = header
            name = checkpoint_name(args.step)
            status(f"saving {backend.url}/{name}")
            info = ckptstore.save(
                state, f"{backend.url}/{name}", step=args.step, codec=args.codec, metadata=metadata
            )
    except FileNotFoundError as exc:
        if isinstance(exc, CkptStoreError):
            raise
        raise usage_error(f"{args.file}: no such file; check the path") from None
    except ExportError as exc:
        raise CliError(str(exc)) from None
    except CheckpointExistsError as exc:
        raise CliError(f"{exc}; pass --step N with a step not taken") from None
    finally:
        status(None)
    if not existing or (existing[-1].manifest.step or 0) < args.step:
        # The newest checkpoint: the `latest` pointer names it, as after any save.
        try:
            pointer.write_latest(backend, name)
        except CkptStoreError as exc:  # (the checkpoint is in: say so, and why not latest)
            raise CliError(f"imported {name}, but {exc}") from None
    m = info.manifest
    print(
        f"imported {args.file} as {info.url}: {len(flat_tensors(state)[0])} tensor(s), "
        f"{size(m.raw_bytes)} raw, {size(m.stored_bytes)} stored ({m.codec.get('id')}, "
        f"ratio {m.ratio:.3f}) in {time.monotonic() - start:.1f} s"
    )
    return OK


# Where training scripts keep their step in a torch.save file (nanoGPT: iter_num).
STEP_KEYS = ("iter_num", "global_step", "step")


def read_any(local: str, fmt: str, shown: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The state in a file (pt, safetensors) or a DCP directory, and its file metadata."""
    if fmt == "dcp":
        from ckptstore.interop import read_dcp_dir

        return read_dcp_dir(local), {}
    from ckptstore.convert import read_file

    return read_file(local, fmt, shown=shown)


def step_in(state: dict[str, Any], header: dict[str, str] | None = None) -> int:
    """The step a training script recorded in its file (nanoGPT's ``iter_num``, others'
    ``global_step`` / ``step``; a ckptstore TrainState's ``counters.step``; the
    ``ckptstore_step`` of a safetensors file ``ckptstore export`` wrote), else 0."""
    counters = state.get("counters")
    values = [state.get(key) for key in STEP_KEYS]
    values.append(counters.get("step") if isinstance(counters, dict) else None)
    values.append((header or {}).get("ckptstore_step"))
    for value in values:
        if isinstance(value, str) and value.isascii() and value.isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_STEP:
            return value
    return 0


def check_free(backend: Any, step: int) -> list[Any]:
    """The root's checkpoints; a usage error if ``step`` is taken."""
    existing = list_checkpoints(backend, manifest_key=manifest_key())
    name = checkpoint_name(step)
    if backend.exists(f"{name}/{MANIFEST_FILE}"):
        newest = existing[-1].manifest.step if existing else step
        raise CliError(
            f"{backend.url}/{name} already exists and ckptstore never overwrites a checkpoint: "
            f"pass --step N with a step not taken (the newest is {newest}; "
            f"--step {int(newest or 0) + 1} is free), or import into another root"
        )
    return existing
