"""``ckptstore export``: a checkpoint as one torch.save (.pt) or safetensors file,
unsharded, for inference or sharing (no model code needed).

It refuses to replace an existing file unless told to (``--force``), and says on stdout
what it wrote.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

from ckptstore.cli._common import (
    OK,
    int_at_least,
    is_url,
    manifest_key,
    note,
    refuse_inside_checkpoint,
    resolve_checkpoint,
    size,
    status,
    usage_error,
    usage_errors,
)
from ckptstore.convert import (
    DTYPES,
    FORMATS,
    convert_dtype,
    file_format,
    flat_tensors,
    local_output,
    output_exists,
    read_checkpoint,
    write_file,
)
from ckptstore.errors import CliError, ExportError

EXAMPLES = (
    "  ckptstore export runs/exp1/step_00000500 full.pt\n"
    "  ckptstore export runs/exp1 model.safetensors --only model --dtype bf16\n"
    "  ckptstore export s3://my-bucket/runs/exp1 --step 500 optim.pt --only optim\n"
    "  ckptstore export runs/exp1 out/step-500 --format dcp   # for stock dcp.load\n\n"
    "--only PREFIX keeps the keys under PREFIX and removes the prefix: --only model\n"
    "gives the model's state_dict as saved (model.load_state_dict() takes it);\n"
    "--keep-prefix keeps the full keys. .pt keeps the nesting and every Python value\n"
    "(loads with torch.load(path, weights_only=True)); .safetensors holds tensors\n"
    "only, under dotted keys (tensors that share memory, such as tied weights, are\n"
    "written under each of their keys). --dtype casts float16/bfloat16/float32/\n"
    "float64 tensors only (not fp8, integer or complex ones).\n"
    "The whole selection is held in memory."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="CKPT")
    p.add_argument("out", metavar="OUT", help="a .pt or .safetensors path (or an s3:// URL)")
    p.add_argument("--step", type=int_at_least(0), metavar="N", help="checkpoint N of ROOT")
    p.add_argument("--only", metavar="PREFIX", help="only keys under PREFIX (e.g. model)")
    p.add_argument("--keep-prefix", action="store_true", help="with --only: keep the full keys")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), metavar="DTYPE", help="bf16, fp16, fp32, fp64"
    )
    p.add_argument(
        "--format",
        choices=(*FORMATS, "dcp"),
        help="default: from OUT's suffix; dcp: a directory stock dcp.load reads",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--jobs", type=int_at_least(1), metavar="N", help="threads (default: cores)")


def _threads(args: argparse.Namespace) -> int:
    return int(args.jobs or min(8, os.cpu_count() or 1))


def run(args: argparse.Namespace) -> int:
    if args.format == "dcp":
        fmt = "dcp"
        if is_url(args.out):
            raise usage_error("--format dcp writes a local directory: give a local OUT path")
    else:
        with usage_errors(ExportError):
            fmt = file_format(args.out, args.format)
    dtype = None
    if args.dtype is not None:
        dtype = DTYPES[args.dtype]
    backend, name = resolve_checkpoint(args.ckpt, args.step, what="export")
    if not is_url(args.out):
        refuse_inside_checkpoint(args.out, "OUT")
    if not args.force and output_exists(args.out):  # before reading gigabytes
        raise CliError(_exists_message(args.out))
    replacing = args.force and not is_url(args.out) and output_exists(args.out)
    if replacing:
        _refuse_to_replace(args.out, fmt)
    start = time.monotonic()
    status(f"reading {backend.url}/{name}")
    with ThreadPoolExecutor(_threads(args), thread_name_prefix="ckptstore-codec") as pool:
        try:
            exported = read_checkpoint(
                backend,
                name,
                only=args.only,
                keep_prefix=args.keep_prefix,
                pool=pool,
                manifest_key=manifest_key(),
            )
        except ExportError as exc:
            raise usage_error(str(exc)) from None
        finally:
            status(None)
    obj = exported.obj
    converted = 0
    if dtype is not None:
        obj, converted = convert_dtype(obj, dtype)
    skipped: list[str] = []
    if fmt == "safetensors":
        _, skipped = flat_tensors(obj)
    source = f"{backend.url}/{name}"
    header = {"format": "pt", "ckptstore_source": source}
    if exported.manifest.step is not None:
        header["ckptstore_step"] = str(exported.manifest.step)
    if fmt == "dcp":
        from ckptstore.interop import write_dcp_dir

        status(f"writing {args.out}")
        try:
            write_dcp_dir(obj, args.out, overwrite=args.force)
        except FileExistsError:
            raise CliError(_exists_message(args.out)) from None
        except ExportError as exc:
            raise CliError(f"{exc}: choose another OUT") from None
        finally:
            status(None)
        print(
            f"{'replaced' if replacing else 'wrote'} {args.out}: a DCP checkpoint directory "
            f"(dcp.load reads it), from {source} ({time.monotonic() - start:.1f} s)"
        )
        return OK
    try:
        with local_output(args.out, overwrite=args.force) as tmp:
            status(f"writing {args.out}")
            count = write_file(obj, tmp, fmt, header)
            written = os.path.getsize(tmp)
    except FileExistsError:
        raise CliError(_exists_message(args.out)) from None
    finally:
        status(None)
    kind = "torch.save" if fmt == "pt" else "safetensors"
    parts = [
        f"{'replaced' if replacing else 'wrote'} {args.out} ({kind} format): {count} "
        f"tensor(s), {size(written)}, from {source}"
    ]
    if exported.stripped is not None:
        parts.append(f"keys under {exported.stripped!r} with that prefix removed")
    if converted:
        parts.append(f"{converted} floating tensor(s) cast to {str(dtype).removeprefix('torch.')}")
    print("; ".join(parts) + f" ({time.monotonic() - start:.1f} s)")
    if skipped:
        shown = ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        note(
            f"safetensors holds tensors only: {len(skipped)} non-tensor value(s) left out "
            f"({shown}); export to .pt to keep them"
        )
    return OK


def _refuse_to_replace(out: str, fmt: str) -> None:
    """``--force`` replaces an earlier export, not a directory of other files."""
    if fmt == "dcp":
        from ckptstore.interop import why_not_replace

        why = why_not_replace(out)
        if why is not None:
            raise CliError(
                f"not replacing {out} even with --force: {why}; "
                "--force replaces only an earlier DCP export (or an empty directory): "
                "choose another OUT"
            )
    elif os.path.isdir(os.path.expanduser(out.removeprefix("file://"))):
        raise CliError(
            f"{out} is a directory: --format {fmt} writes one file; give a file path "
            "(OUT/model.pt), or --format dcp for a directory"
        )


def _exists_message(out: str) -> str:
    return f"{out} already exists: pass --force to replace it, or choose another name"
