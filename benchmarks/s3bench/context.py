"""What every part shares: the server, a bucket, the work directory, and timing that
records the server's CPU, the rest of the machine's and the S3 requests made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ckptstore
from ckptstore.bench.common import measure
from s3bench.link import RequestCounter, proc_cpu_s, system_busy_s

if TYPE_CHECKING:
    from ckptstore.storage.testing.s3server import S3Server


def files_bytes(manifest: Any) -> int:
    return sum(e.size_bytes for e in manifest.files.values())


class Ctx:
    """What every part shares: the server, a bucket, the work directory."""

    def __init__(self, server: S3Server, work: str, closers: list[Callable[[], Any]]) -> None:
        self.server = server
        self.work = work
        self.closers = closers
        self.bucket = server.new_bucket()
        self.opts = server.options()
        self.pid = server.proc.pid if server.proc else 0
        self.requests = RequestCounter()
        self.requests.install()
        closers.append(self.requests.uninstall)

    def server_cpu(self) -> float:
        return proc_cpu_s(self.pid)

    def timed(self, fn: Callable[[], Any]) -> dict[str, float]:
        """Run ``fn``: wall time, this process's CPU, the server's CPU, CPU used by
        anything else on the machine meanwhile (noise), and S3 requests made."""
        s0, b0, q0 = self.server_cpu(), system_busy_s(), self.requests.snapshot()
        with measure() as m:
            extra = fn()
        if not isinstance(extra, dict):
            extra = {}
        server = self.server_cpu() - s0
        q = self.requests.snapshot() - q0
        return {
            "wall_s": m["wall_s"],
            "cpu_s": m["cpu_s"],
            "server_cpu_s": server,
            "other_cpu_s": max(0.0, system_busy_s() - b0 - m["cpu_s"] - server),
            "requests": float(sum(q.values())),
            "get_requests": float(q["get_object"]),
            **extra,
        }

    def raw_fs(self, opts: dict[str, Any] | None = None) -> Any:
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **(opts or self.opts))

    def checkpointer(self, root: str, **kw: Any) -> ckptstore.Checkpointer:
        ck = ckptstore.Checkpointer(root, **kw)
        self.closers.append(ck.close)
        return ck
