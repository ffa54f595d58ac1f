"""What must hold after any fault, checked in a fresh process.

Every fault test (process kill, power loss, I/O error, full disk, object-store trouble)
ends the same way::

    expected = {step: digest_state(state_saved_at(step)) for step in steps_attempted}
    check_invariants(root_url, expected=expected, newest=last_step_whose_save_returned)

:func:`check_invariants` runs a new Python interpreter (nothing of the faulted process's
memory, caches or open handles) that checks the root with ckptstore's public reading
API and raises :class:`InvariantError` listing every problem it found:

1. Every listed checkpoint verifies (manifest, sizes, checksums of every byte).
2. The newest checkpoint known good before the fault (``newest``; None if there was
   none) is still listed and restores bit-exact; so does every other
   listed checkpoint. A listed step missing from ``expected`` is a problem too (a
   checkpoint nobody saved): ``expected`` names every step the faulted run may have
   saved, with the digest of the state it saved there.
3. Nothing temporary sits under a final name: after ``gc`` (``backend.sweep(0)``, as
   ``ckptstore gc --grace-s 0`` does) every name under the root is a listed checkpoint
   or a pointer file (``latest``, ``finals``): no temp directory, no pointer temp file,
   no ``step_*`` without a valid manifest; on S3 no multipart upload is left open; gc
   removed no committed checkpoint; ``latest`` names a listed checkpoint.
4. :func:`assert_surfaced`: the fault came out as one of ckptstore's typed errors, or
   the process died (a signal); the harness bounds every wait with a timeout.

Local disk spares temp directories younger than a few seconds whatever the grace
period (a save between ``mkdir`` and ``flock`` must not be swept); the checker
backdates the root's temp entries first, as if that much time had passed. Live saves
stay protected by their lock.

``python tests/invariants.py`` reads one JSON request on stdin and prints the report;
:func:`check_here` is the same check in the calling process (for a process forked
just for it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# .writer-lease: a manager wrote here; .disk-id: a Checkpointer did
POINTER_FILES = ("latest", "finals", ".writer-lease", ".disk-id")


class InvariantError(AssertionError):
    """One or more invariants failed after a fault; ``report`` says which and why."""

    def __init__(self, problems: list[str], report: dict[str, Any]) -> None:
        self.problems = problems
        self.report = report
        super().__init__(
            f"{len(problems)} invariant violation(s) under {report.get('root')}:\n  "
            + "\n  ".join(problems)
        )


def digest_state(state: Any) -> str:
    """sha256 over every tensor (path, dtype, shape, bytes) and plain value of a state.

    Nested dicts and lists are walked; paths join keys with ``.`` as DCP's keys do, so
    a state and what :func:`check_here` restores from its checkpoint digest alike.
    """
    import torch

    h = hashlib.sha256()
    items: list[tuple[str, Any]] = []

    def walk(x: Any, path: str) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{path}.{i}" if path else str(i))
        else:
            items.append((path, x))

    walk(state, "")
    for path, x in sorted(items, key=lambda kv: kv[0]):
        h.update(path.encode() + b"\0")
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{list(x.shape)}".encode())
            if t.numel():
                h.update(t.view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(x).encode())
    return h.hexdigest()


def check_here(
    root_url: str,
    *,
    expected: dict[int, str],
    newest: int | None,
    storage_options: dict[str, Any] | None = None,
    gc: bool = True,
) -> dict[str, Any]:
    """The checks, in this process; returns the report (``report["problems"]``)."""
    from ckptstore.convert import read_checkpoint
    from ckptstore.engine.ops import list_checkpoints, verify
    from ckptstore.storage import TEMP_PREFIX, open_backend
    from ckptstore.storage.local import POINTER_TEMP_PREFIX, LocalBackend

    expected = {int(k): v for k, v in expected.items()}
    backend = open_backend(root_url, storage_options=storage_options, create=False)
    problems: list[str] = []
    report: dict[str, Any] = {"root": backend.url, "problems": problems}
    names = backend.list_names()
    infos = list_checkpoints(backend)
    listed = {info.name: info.manifest.step for info in infos}
    report["names"] = names
    report["listed"] = sorted(s for s in listed.values() if s is not None)

    # 1. Every listed checkpoint verifies.
    for info in infos:
        problems += [f"{info.name}: verify: {p}" for p in verify(backend, info.name, None)]

    # 2. The newest good one survives; every listed one restores to what was saved.
    if newest is not None and newest not in listed.values():
        problems.append(
            f"step {newest}, the newest checkpoint that was good before the fault, is gone "
            f"(listed: {report['listed']}, names: {names})"
        )
    restored = []
    for name, step in listed.items():
        want = expected.get(step) if step is not None else None
        if want is None:
            problems.append(f"{name}: listed, but the faulted run never saved step {step}")
            continue
        try:
            got = digest_state(read_checkpoint(backend, name).obj)
        except Exception as exc:
            problems.append(f"{name}: restore failed: {type(exc).__name__}: {exc}")
            continue
        if got != want:
            problems.append(f"{name}: restored state differs from the one saved at step {step}")
        restored.append(step)
    report["restored"] = sorted(restored)
    latest = _read_pointer(backend, "latest")
    if latest is not None and latest not in listed:
        problems.append(f"latest names {latest!r}, which is not a committed checkpoint")

    # 3. Nothing temporary under a final name; gc leaves nothing behind.
    temp_listed = [n for n in listed if n.startswith((TEMP_PREFIX, POINTER_TEMP_PREFIX))]
    if temp_listed:
        problems.append(f"temporary names listed as committed checkpoints: {temp_listed}")
    report["temp_before_gc"] = [n for n in names if n not in listed and n not in POINTER_FILES]
    open_uploads = getattr(backend, "open_uploads", None)
    if open_uploads is not None:
        report["open_uploads_before_gc"] = [u["Key"] for u in open_uploads()]
    if gc:
        if isinstance(backend, LocalBackend):
            old = time.time() - 3600
            for n in names:
                if n.startswith((TEMP_PREFIX, POINTER_TEMP_PREFIX)):
                    with contextlib.suppress(FileNotFoundError):
                        os.utime(os.path.join(backend.root, n), (old, old), follow_symlinks=False)
        removed = backend.sweep(0)
        after = backend.list_names()
        if not backend.is_local() and [n for n in after if n not in listed]:
            time.sleep(1.1)  # object timestamps have whole seconds: let "0 s old" pass
            removed += backend.sweep(0)
            after = backend.list_names()
        report["removed_by_gc"] = removed
        left = [n for n in after if n not in listed and n not in POINTER_FILES]
        if left:
            problems.append(f"after gc, names that are neither checkpoints nor pointers: {left}")
        gone = sorted(set(listed) - set(after))
        if gone:
            problems.append(f"gc removed committed checkpoints: {gone}")
        if open_uploads is not None:
            uploads = [u["Key"] for u in open_uploads()]
            report["open_uploads_after_gc"] = uploads
            if uploads:
                problems.append(f"after gc, multipart uploads still open: {uploads}")
    return report


def _read_pointer(backend: Any, name: str) -> str | None:
    try:
        lines = backend.read_bytes(name).decode().split()
    except FileNotFoundError:
        return None
    return lines[0] if lines else None


def check_invariants(
    root_url: str,
    *,
    expected: dict[int, str],
    newest: int | None,
    storage_options: dict[str, Any] | None = None,
    gc: bool = True,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Check the invariants in a fresh interpreter; return its report, or raise
    :class:`InvariantError` (a hung check is one too)."""
    request = {
        "root_url": root_url,
        "expected": {str(k): v for k, v in expected.items()},
        "newest": newest,
        "storage_options": storage_options,
        "gc": gc,
    }
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CKPTSTORE_CRASH_AT", None)
    try:
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, "invariants.py")],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise InvariantError(
            [f"the check did not finish within {timeout_s} s"], {"root": root_url}
        ) from None
    return raise_on_problems(_parse(proc.stdout, proc.returncode, proc.stderr, root_url))


def raise_on_problems(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` as it is if it has no problems, else :class:`InvariantError`."""
    if report["problems"]:
        raise InvariantError(report["problems"], report)
    return report


def _parse(stdout: str, returncode: int, stderr: str, root_url: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            report: dict[str, Any] = json.loads(line)
            return report
    return {
        "root": root_url,
        "problems": [f"the checker exited with {returncode} and no report: {stderr[-2000:]}"],
    }


def assert_surfaced(error: BaseException | None = None, *, returncode: int | None = None) -> None:
    """Invariant 4: the fault surfaced as a typed ckptstore error, or the process died.

    Pass the exception that ``save()`` / ``wait()`` / ``close()`` raised, or the exit
    status of a process that was faulted (negative: killed by that signal).
    """
    from ckptstore.errors import CkptStoreError

    if returncode is not None:
        assert returncode < 0, f"the faulted process exited with {returncode}, not by a signal"
        assert -returncode in (signal.SIGKILL, signal.SIGTERM, signal.SIGABRT), (
            f"the faulted process died of signal {-returncode}"
        )
        return
    assert error is not None, "the fault was swallowed: nothing raised"
    assert isinstance(error, CkptStoreError), (
        f"the fault surfaced as {type(error).__name__}: {error}, not a ckptstore error"
    )


if __name__ == "__main__":
    req = json.loads(sys.stdin.read())
    try:
        out = check_here(
            req["root_url"],
            expected=req["expected"],
            newest=req["newest"],
            storage_options=req["storage_options"],
            gc=req["gc"],
        )
    except Exception as exc:  # the check itself broke: that is a finding too
        out = {"root": req["root_url"], "problems": [f"check raised {type(exc).__name__}: {exc}"]}
    print(json.dumps(out, default=str), flush=True)
