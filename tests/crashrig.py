"""Crash trials at scale: a fork server with ckptstore imported once, a fresh child per job.

Starting Python with torch takes ~4 s here, so a new interpreter per trial would allow a
handful of trials a minute. :class:`ForkServer` starts one interpreter that imports
torch, ckptstore and s3fs and then only forks: each trial's saving process and each
fresh checking process is a real child process (its own pid, killed by a real
``SIGKILL``) that shares nothing with the others but the imported code. The server
never touches a checkpoint root, opens a file system, or starts a thread, so a forked
child starts with no caches, handles or threads: as fresh as a new interpreter, for
what the checks look at.

Jobs (run in the child):

* ``loop``: save checkpoints ``1..steps`` of :func:`make_state` in a loop, with a
  :class:`~ckptstore.Checkpointer` or a :class:`~ckptstore.CheckpointManager` (with
  ``KeepLast(keep)``); the first ``baseline`` steps are saved before the crash point
  ``crash_at`` is armed. With ``resume``, it continues after the newest checkpoint
  already under the root instead (a run restarted after a crash). Progress lines (``saving N``, ``committed N``) go to
  ``progress``, written before and after each save, so the parent knows what may exist
  and what was durable when the child died.
* ``check``: :func:`invariants.check_here`, the report written to ``out`` as JSON.

The server forks; it does not reap on its own: ``wait`` does, with a timeout after
which the child is killed (a hung child is a finding, not a hung test run).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def make_state(step: int, numel: int) -> dict[str, Any]:
    """The state a trial saves at ``step``: deterministic, different for every step."""
    import torch
    from helpers import Randn, build_state

    return build_state(
        1000 + step,
        model={
            "w": Randn(numel),
            "b": torch.arange(37, dtype=torch.int64) + step,
            "h": Randn((3, 5), torch.bfloat16),
        },
        # the same every step, over half the bytes: what incremental saves link
        opt={"m": torch.full((257,), float(step)), "frozen": torch.arange(numel * 6 // 5) * 0.5},
    )


def expected_digests(steps: int, numel: int) -> dict[int, str]:
    from invariants import digest_state

    return {s: digest_state(make_state(s, numel)) for s in range(1, steps + 1)}


def read_progress(path: str) -> tuple[int, int]:
    """(the last step a save was started for, the last step known committed); 0: none."""
    saving = committed = 0
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[1].isdigit():
                    if parts[0] == "saving":
                        saving = max(saving, int(parts[1]))
                    elif parts[0] == "committed":
                        committed = max(committed, int(parts[1]))
    except FileNotFoundError:
        pass
    return saving, committed


# ---- in the child ---------------------------------------------------------------------
def _arm(crash_at: str | None) -> None:
    """As if ckptstore had been imported with CKPTSTORE_CRASH_AT=crash_at."""
    import importlib

    import ckptstore.crashpoints

    if crash_at is None:
        os.environ.pop("CKPTSTORE_CRASH_AT", None)
    else:
        os.environ["CKPTSTORE_CRASH_AT"] = crash_at
    # The module reads the variable at import; reloading re-runs it in the same module
    # namespace, which the imported crash_point functions look their global up in.
    importlib.reload(ckptstore.crashpoints)


def _open_root(job: dict[str, Any]) -> Any:
    url = job["root_url"]
    if not url.startswith("s3://"):
        return url
    import s3fs

    from ckptstore.storage import S3Backend

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **(job.get("storage_options") or {}))
    return S3Backend(fs, url[len("s3://") :], url, part_bytes=job.get("part_bytes", 5 << 20))


def run_loop(job: dict[str, Any]) -> None:
    import ckptstore

    fd = os.open(job["progress"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def note(what: str, step: int) -> None:
        os.write(fd, f"{what} {step}\n".encode())

    root = _open_root(job)
    numel = job["numel"]
    config = {"codec": job.get("codec", "none"), "chunk_bytes": 64 << 10, "threads": 2}
    if job.get("incremental"):
        config["incremental"] = True
    baseline = job.get("baseline", 0)
    if baseline:
        with ckptstore.Checkpointer(root, **config) as ckpt:
            for step in range(1, baseline + 1):
                note("saving", step)
                ckpt.save(make_state(step, numel), step)
                note("committed", step)
    _arm(job.get("crash_at"))
    first = baseline + 1
    if job.get("resume"):
        with ckptstore.Checkpointer(root, **config) as ckpt:
            latest = ckpt.latest()
        first = (latest.step or 0) + 1 if latest is not None else 1
    steps = range(first, first + job["steps"] - baseline)
    if job["mode"] == "checkpointer":
        with ckptstore.Checkpointer(root, max_inflight=job.get("inflight", 1), **config) as ckpt:
            pending: list[Any] = []
            for step in steps:
                note("saving", step)
                pending.append(ckpt.save_async(make_state(step, numel), step))
                while len(pending) >= job.get("inflight", 1):
                    p = pending.pop(0)
                    p.wait()
                    note("committed", p.step)
            for p in pending:
                p.wait()
                note("committed", p.step)
    else:
        keep = ckptstore.KeepLast(job["keep"]) if job.get("keep") else None
        with ckptstore.CheckpointManager(root, keep=keep, **config) as mgr:
            for step in steps:
                note("saving", step)
                p = mgr.save(step - 1, make_state(step, numel))  # saves steps done: step
                assert p is not None
                p.wait()
                note("committed", step)
            mgr.wait()
    os.close(fd)


def run_check(job: dict[str, Any]) -> None:
    from invariants import check_here

    reports = []
    for req in job["requests"]:
        try:
            report = check_here(
                req["root_url"],
                expected={int(k): v for k, v in req["expected"].items()},
                newest=req["newest"],
                storage_options=req.get("storage_options"),
                gc=req.get("gc", True),
            )
        except Exception as exc:
            report = {"root": req["root_url"], "problems": [f"check raised {exc!r}"]}
        reports.append(report)
    with open(job["out"], "w") as f:
        json.dump(reports, f, default=str)


def _child(job: dict[str, Any]) -> None:
    code = 0
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        if job.get("log"):
            log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(log, 2)
        {"loop": run_loop, "check": run_check}[job["kind"]](job)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stderr.flush()
        os._exit(code)


def _serve() -> None:
    # Imported once, for every child.
    import s3fs  # noqa: F401
    import torch  # noqa: F401

    import ckptstore.convert  # noqa: F401

    sys.path.insert(0, HERE)
    import helpers  # noqa: F401
    import invariants  # noqa: F401

    children: set[int] = set()
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        if op == "fork":
            pid = os.fork()
            if pid == 0:
                _child(req["job"])
            children.add(pid)
            reply: dict[str, Any] = {"pid": pid}
        elif op == "wait":
            pid = req["pid"]
            deadline = time.monotonic() + req["timeout_s"]
            timed_out = False
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    os.kill(pid, signal.SIGKILL)
                    _, status = os.waitpid(pid, 0)
                    break
                time.sleep(0.005)
            children.discard(pid)
            reply = {"returncode": os.waitstatus_to_exitcode(status), "timed_out": timed_out}
        else:
            break
        out.write(json.dumps(reply) + "\n")
        out.flush()
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass


# ---- in the test ----------------------------------------------------------------------
class ForkServer:
    """The parent's handle on the fork server process; a context manager that stops it."""

    def __init__(self, start_timeout_s: float = 120.0) -> None:
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("CKPTSTORE_CRASH_AT", None)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            line = self._readline(start_timeout_s)
            if line.strip() != "ready":
                raise RuntimeError(f"fork server did not start: {line!r}")
        except BaseException:
            self.close()
            raise

    def _readline(self, timeout_s: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            raise TimeoutError(f"fork server gave no answer within {timeout_s} s")
        return self.proc.stdout.readline()

    def _ask(self, req: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self._readline(timeout_s)
        if not line:
            raise RuntimeError(f"fork server died ({self.proc.poll()})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def fork(self, job: dict[str, Any]) -> int:
        """Start ``job`` in a new child; its pid (the caller may kill it)."""
        return int(self._ask({"op": "fork", "job": job}, 30)["pid"])

    def wait(self, pid: int, timeout_s: float) -> tuple[int, bool]:
        """(exit status, negative for a signal; whether it had to be killed at the timeout)."""
        reply = self._ask({"op": "wait", "pid": pid, "timeout_s": timeout_s}, timeout_s + 30)
        return int(reply["returncode"]), bool(reply["timed_out"])

    def check(
        self,
        root_url: str,
        *,
        expected: dict[int, str],
        newest: int | None,
        workdir: str,
        storage_options: dict[str, Any] | None = None,
        gc: bool = True,
        timeout_s: float = 120.0,
    ) -> dict[str, Any]:
        """:func:`invariants.check_here` in a freshly forked child; the report (its
        ``problems`` list is empty when every invariant holds)."""
        request = {
            "root_url": root_url,
            "expected": expected,
            "newest": newest,
            "storage_options": storage_options,
            "gc": gc,
        }
        return self.check_many([request], workdir=workdir, timeout_s=timeout_s)[0]

    def check_many(
        self, requests: list[dict[str, Any]], *, workdir: str, timeout_s: float = 120.0
    ) -> list[dict[str, Any]]:
        """Several independent roots checked by one freshly forked child, one after the
        other; each request holds :meth:`check`'s arguments. One report per request."""
        out = os.path.join(workdir, f"check-{time.monotonic_ns()}.json")
        log = out + ".log"
        for req in requests:
            req["expected"] = {str(k): v for k, v in req["expected"].items()}
        pid = self.fork({"kind": "check", "requests": requests, "out": out, "log": log})
        code, timed_out = self.wait(pid, timeout_s)
        if timed_out:
            problem = f"the check hung for {timeout_s} s"
        else:
            try:
                with open(out) as f:
                    reports: list[dict[str, Any]] = json.load(f)
                return reports
            except FileNotFoundError:
                with open(log) as f:
                    problem = f"the check exited with {code}: {f.read()[-2000:]}"
        return [{"root": r["root_url"], "problems": [problem]} for r in requests]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    _serve()
