"""The server, the link: CPU the moto server and the rest of the machine used, the S3
requests made (counted in s3fs), and a rate-limited TCP proxy that emulates a link
slower than the server.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import Counter
from typing import Any

from s3bench import MB


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (the moto server)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_busy_s() -> float:
    """CPU seconds all processes on this machine have been busy (user, nice, system, irq)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


class RequestCounter:
    """Counts S3 API calls by method: wraps ``S3FileSystem._call_s3``, which every s3fs
    operation and ckptstore's S3 backend go through. Instrumentation only."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._orig: Any = None

    def install(self) -> None:
        import s3fs

        orig = self._orig = s3fs.S3FileSystem._call_s3
        counter = self

        async def counted(fs: Any, method: Any, *args: Any, **kwargs: Any) -> Any:
            with counter._lock:
                counter.counts[str(method)] += 1
            return await orig(fs, method, *args, **kwargs)

        s3fs.S3FileSystem._call_s3 = counted

    def uninstall(self) -> None:
        if self._orig is not None:
            import s3fs

            s3fs.S3FileSystem._call_s3 = self._orig
            self._orig = None

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)


class _Pacer:
    """A shared rate limit: each chunk waits for its slot on a link of ``bps``."""

    def __init__(self, bps: float) -> None:
        self.bps = bps
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def take(self, n: int, stop: threading.Event) -> None:
        with self._lock:
            now = time.monotonic()
            self._next = max(now, self._next) + n / self.bps
            wait = self._next - now
        if wait > 0:
            stop.wait(wait)


class ThrottleProxy:
    """TCP proxy on 127.0.0.1 in front of ``target_port``, ``mbps`` MB/s per direction,
    shared by every connection (one link, not one limit per connection)."""

    CHUNK = 64 * 1024

    def __init__(self, target_port: int, mbps: float) -> None:
        self.target = ("127.0.0.1", target_port)
        self.up = _Pacer(mbps * MB)
        self.down = _Pacer(mbps * MB)
        self._stop = threading.Event()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._accept = threading.Thread(target=self._accept_loop, name="throttle-accept")

    def start(self) -> ThrottleProxy:
        self._accept.start()
        return self

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.settimeout(0.2)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks += [client, upstream]
                for src, dst, pacer in ((client, upstream, self.up), (upstream, client, self.down)):
                    t = threading.Thread(
                        target=self._pump, args=(src, dst, pacer), name="throttle-pump"
                    )
                    self._threads.append(t)
                    t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, pacer: _Pacer) -> None:
        try:
            while not self._stop.is_set():
                try:
                    data = src.recv(self.CHUNK)
                except TimeoutError:
                    continue
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                pacer.take(len(data), self._stop)
                view = memoryview(data)
                while view and not self._stop.is_set():
                    try:
                        view = view[dst.send(view) :]
                    except TimeoutError:
                        continue
        except OSError:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._stop.set()
        self._accept.join(5)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            threads, socks = list(self._threads), list(self._socks)
        for t in threads:
            t.join(5)
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
