"""``ckptstore import``: a torch.save (.pt) or safetensors file brought in as a committed
checkpoint.

The file is read with ``torch.load(weights_only=True)``; an existing step is never
overwritten, and the ``latest`` pointer moves only if the new checkpoint is the newest.
"""

from __future__ import annotations

import argparse
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
)
from ckptstore.engine.listing import list_checkpoints
from ckptstore.errors import CheckpointExistsError, CkptStoreError, CliError, ExportError
from ckptstore.layout import LATEST_FILE, MANIFEST_FILE, checkpoint_name

EXAMPLES = (
    "  ckptstore import old/checkpoint_epoch3.pt runs/exp1 --step 3000\n"
    "  ckptstore import model.safetensors s3://my-bucket/models/gpt\n\n"
    "The file is read with torch.load(weights_only=True): tensors, numbers,\n"
    "strings, lists and dicts, nothing that runs code. It must hold a dict (a\n"
    "state_dict, or {'model': ..., 'optimizer': ..., 'epoch': ...}). An existing\n"
    "step is never overwritten."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("--step", type=int_at_least(0), default=0, metavar="N", help="default: 0")
    p.add_argument("--codec", choices=("auto", "none", "zstd"), default="auto")
    p.add_argument("--format", choices=("pt", "safetensors"), help="default: from the suffix")


def run(args: argparse.Namespace) -> int:
    # torch: imported when the command runs, not for its --help or a usage error
    from ckptstore.convert import file_format, flat_tensors, local_input, read_file

    with usage_errors(ExportError):
        fmt = file_format(args.file, args.format)
    if not is_url(args.file) and not os.path.isfile(local_path(args.file)):
        raise usage_error(f"{args.file}: no such file; check the path")
    # The destination first: a taken step fails before a large file is read.
    backend = open_root(args.root, create=True)
    name = checkpoint_name(args.step)
    existing = list_checkpoints(backend, manifest_key=manifest_key())
    if backend.exists(f"{name}/{MANIFEST_FILE}"):
        newest = existing[-1].manifest.step if existing else args.step
        raise CliError(
            f"{backend.url}/{name} already exists and ckptstore never overwrites a checkpoint: "
            f"pass --step N with a step not taken (the newest is {newest}; "
            f"--step {int(newest or 0) + 1} is free), or import into another root"
        )
    metadata: dict[str, Any] = {
        "imported_from": os.path.basename(args.file.rstrip("/")),
        "imported_format": "torch.save" if fmt == "pt" else "safetensors",
    }
    start = time.monotonic()
    try:
        with local_input(args.file) as local:
            status(f"reading {args.file}")
            state, header = read_file(local, fmt, shown=args.file)
            if header:
                metadata["safetensors_metadata"] = header
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
        backend.put_atomic(LATEST_FILE, f"{name}\n".encode())
    m = info.manifest
    print(
        f"imported {args.file} as {info.url}: {len(flat_tensors(state)[0])} tensor(s), "
        f"{size(m.raw_bytes)} raw, {size(m.stored_bytes)} stored ({m.codec.get('id')}, "
        f"ratio {m.ratio:.3f}) in {time.monotonic() - start:.1f} s"
    )
    return OK
