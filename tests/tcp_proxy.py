"""Loopback TCP proxy that injects network faults between a client and a server.

The S3 tests run a real S3-compatible server (moto in server mode) on 127.0.0.1 and point
s3fs at this proxy instead of the server, so a test can reset connections mid-upload, add
latency, or make the server stop answering, without touching either side's code.

Standard library only. One accept thread, and per connection one thread per direction;
every thread is a daemon named ``tcpproxy-...`` and ``stop()`` joins them all. Sockets are
non-blocking and every wait is a short poll, so each thread notices ``stop()`` (and fault
changes) within ``_TICK`` seconds.

Faults can be changed at any time from the test thread:

- ``set_latency(s)``: each forwarded chunk (up to 64 KiB, either direction) waits ``s``
  seconds first. Chunks of one direction go one after another, so this also caps
  throughput at about 64 KiB per ``s``.
- ``reset_after(n, times)``: once ``n`` bytes have gone client->server on a connection
  (counted from when the fault is armed), forward exactly those ``n`` bytes, then send
  the client a TCP RST and close the upstream side. Applies to the next ``times``
  connections that reach ``n``, then disarms itself.
- ``blackhole(on)``: a server that stops answering. Connections are accepted and read
  from, but nothing is forwarded either way. Existing connections stop forwarding too;
  turning it off closes those and new connections forward normally again.
- ``refuse(on)``: a server that is down. New connections are accepted and reset at once.
- ``slow_down(n)``: S3 throttling. The next ``n`` new connections get, for their first
  HTTP request, ``503 SlowDown`` (S3's error body, ``Connection: close``) instead of the
  server's answer; existing connections are closed, so that the client's next request
  opens one. Counted in ``slowdowns``.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import struct
import threading
import time
from types import TracebackType

CHUNK = 64 * 1024
# How often a waiting thread looks at the stop flag and the faults.
_TICK = 0.2
_CONNECT_TIMEOUT_S = 5.0
_STOP_TIMEOUT_S = 5.0


def _ready(sock: socket.socket, wake: socket.socket, *, write: bool, timeout: float) -> bool:
    """Wait until ``sock`` can be read (or written); True when it can, or when it is in
    error, so the next recv/send reports the error. False on timeout or when ``wake``
    becomes readable (stop() writes to it, so no thread waits out a whole tick)."""
    fd = sock.fileno()
    if fd < 0:
        raise OSError(errno.EBADF, "socket is closed")
    wake_fd = wake.fileno()
    if hasattr(select, "poll"):
        # poll, not select: select cannot watch descriptors above FD_SETSIZE (1024).
        poller = select.poll()
        poller.register(fd, select.POLLOUT if write else select.POLLIN)
        if wake_fd >= 0:
            poller.register(wake_fd, select.POLLIN)
        mine = 0
        for ready_fd, event in poller.poll(timeout * 1000):
            if ready_fd == wake_fd:
                return False
            mine = event
        if mine & select.POLLNVAL:
            raise OSError(errno.EBADF, "socket is closed")
        return bool(mine)
    rlist = [wake_fd] if wake_fd >= 0 else []
    readable, writable, _ = select.select(
        rlist if write else [*rlist, fd], [fd] if write else [], [], timeout
    )
    if wake_fd in readable:
        return False
    return bool(readable or writable)


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with an RST instead of a FIN, as a crashed or unreachable peer would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 (free port, bound on construction) in front of
    ``target_host:target_port``, with switchable faults. See the module docstring."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._listener.bind(("127.0.0.1", 0))
            self._listener.listen(128)
            self._listener.setblocking(False)
        except OSError:
            self._listener.close()
            raise
        self.port: int = self._listener.getsockname()[1]
        self.url: str = f"http://127.0.0.1:{self.port}"

        self.resets: int = 0
        self.connections: int = 0
        self.slowdowns: int = 0

        self._lock = threading.Lock()
        self._stop = threading.Event()
        # stop() writes a byte here and never reads it: every poll then returns at once.
        self._wake_r, self._wake_w = socket.socketpair()
        self._accept_thread: threading.Thread | None = None
        self._stopped = False
        self._conns: set[_Conn] = set()

        # Faults. Plain attributes read without the lock by the forwarding threads (a
        # single read of a float/bool is atomic); reset_after's state is under _lock.
        self._latency = 0.0
        self._blackhole = False
        self._refuse = False
        self._reset_at = 0
        self._reset_left = 0
        self._reset_gen = 0
        self._slow_left = 0

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> FaultProxy:
        with self._lock:
            if self._stopped:
                raise RuntimeError("FaultProxy cannot be restarted after stop()")
            if self._accept_thread is None:
                self._accept_thread = threading.Thread(
                    target=self._accept_loop, name=f"tcpproxy-{self.port}-accept", daemon=True
                )
                self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection and join every thread. Idempotent."""
        with self._lock:
            self._stopped = True
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        # Joining the accept thread first means no connection appears after the snapshot.
        if self._accept_thread is not None:
            self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.thread.join(max(0.0, deadline - time.monotonic()))
        # Only reached if a thread missed the deadline: release its sockets anyway.
        for conn in conns:
            conn.close()
        if not any(c.thread.is_alive() for c in conns):
            self._wake_r.close()
            self._wake_w.close()
        stuck = [c.thread.name for c in conns if c.thread.is_alive()]
        if self._accept_thread is not None and self._accept_thread.is_alive():
            stuck.append(self._accept_thread.name)
        if stuck:
            raise RuntimeError(f"FaultProxy threads did not stop: {stuck}")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- faults --------------------------------------------------------------------

    def set_latency(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"latency must be >= 0, got {seconds}")
        self._latency = float(seconds)

    def reset_after(self, upstream_bytes: int, times: int = 1) -> None:
        if upstream_bytes < 0 or times < 0:
            raise ValueError(
                f"need upstream_bytes >= 0 and times >= 0, got {upstream_bytes}, {times}"
            )
        with self._lock:
            self._reset_at = upstream_bytes
            self._reset_left = times
            # A new generation makes every connection count its bytes from zero again.
            self._reset_gen += 1

    def blackhole(self, on: bool = True) -> None:
        self._blackhole = on

    def refuse(self, on: bool = True) -> None:
        self._refuse = on

    def slow_down(self, times: int) -> None:
        with self._lock:
            self._slow_left = times
            conns = list(self._conns)
        for conn in conns:
            conn.close()

    def clear(self) -> None:
        self._latency = 0.0
        self._blackhole = False
        self._refuse = False
        with self._lock:
            self._reset_left = 0
            self._slow_left = 0

    def _take_slow_down(self) -> bool:
        with self._lock:
            if self._slow_left <= 0:
                return False
            self._slow_left -= 1
            return True

    # -- internals -----------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not _ready(self._listener, self._wake_r, write=False, timeout=_TICK):
                    continue
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                # e.g. EMFILE; do not spin while it lasts.
                self._stop.wait(0.05)
                continue
            with self._lock:
                self.connections += 1
                cid = self.connections
                # Forget finished connections so a long test does not pile them up.
                self._conns = {c for c in self._conns if c.thread.is_alive()}
            if self._refuse:
                _reset(client)
                continue
            conn = _Conn(self, client, cid)
            with self._lock:
                self._conns.add(conn)
            conn.thread.start()

    def _reset_cut(self, conn: _Conn, n: int) -> int | None:
        """Account ``n`` client->server bytes; if they reach an armed reset threshold,
        return how many of them still go through before the reset, else None."""
        with self._lock:
            if self._reset_left <= 0:
                return None
            if conn.reset_gen != self._reset_gen:
                conn.reset_gen = self._reset_gen
                conn.reset_count = 0
            remaining = self._reset_at - conn.reset_count
            if n < remaining:
                conn.reset_count += n
                return None
            self._reset_left -= 1
            # Counted before the RST goes out, so a client that sees the reset sees it here.
            self.resets += 1
            return max(remaining, 0)


class _Conn:
    """One proxied connection: its sockets and its two forwarding threads. The main
    thread connects upstream, forwards client->server and, when done, joins the
    server->client thread and closes both sockets."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, cid: int) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.name = f"tcpproxy-{proxy.port}-c{cid}"
        # Held around every send to the client and around closing it, so a reset from
        # one thread never closes the socket under the other's send.
        self.lock = threading.Lock()
        self.closed = False
        # Sticky: once a connection has been blackholed it never forwards again.
        self.blackholed = False
        self.reset_gen = -1
        self.reset_count = 0
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def _run(self) -> None:
        s2c: threading.Thread | None = None
        try:
            self.client.setblocking(False)
            self._nodelay(self.client)
            if self.proxy._blackhole:
                self.blackholed = True
                self._drain()
                return
            if self.proxy._take_slow_down():
                self._answer_slow_down()
                return
            self.upstream = self._connect()
            if self.upstream is None:
                # Nothing listening upstream: the client sees what it would have seen.
                with self.lock:
                    self.closed = True
                    _reset(self.client)
                return
            thread = threading.Thread(
                target=self._pump,
                args=(self.upstream, self.client, False),
                name=f"{self.name}-s2c",
                daemon=True,
            )
            thread.start()
            s2c = thread
            self._pump(self.client, self.upstream, True)
        except (OSError, ValueError):
            pass  # the client went away before forwarding began; nothing to report
        finally:
            if s2c is not None:
                s2c.join()
            self.close()

    def _answer_slow_down(self) -> None:
        """Read one HTTP request (its body too, unless it waits for ``100-continue``)
        and answer it as S3 does when throttling."""
        data = self._recv_until(lambda d: b"\r\n\r\n" in d, b"")
        if data is None:
            return
        head, _, body = data.partition(b"\r\n\r\n")
        fields = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip().lower()
        if fields.get(b"expect") != b"100-continue":
            length = int(fields.get(b"content-length", b"0") or 0)
            if self._recv_until(lambda d: len(d) >= length, body) is None:
                return
        xml = (
            b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>"
        )
        answer = (
            b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(xml)
        ) + (b"" if head.startswith(b"HEAD ") else xml)  # no body in an answer to HEAD
        with self.proxy._lock:  # counted before the client can see it
            self.proxy.slowdowns += 1
        while answer and not self._done():
            if not _ready(self.client, self.proxy._wake_r, write=True, timeout=_TICK):
                continue
            try:
                answer = answer[self.client.send(answer) :]
            except (BlockingIOError, InterruptedError):
                continue

    def _recv_until(self, enough, data: bytes) -> bytes | None:
        """Read from the client until ``enough(data)``; None if it closed first."""
        deadline = time.monotonic() + 30
        while not enough(data):
            if self._done() or time.monotonic() > deadline:
                return None
            if not _ready(self.client, self.proxy._wake_r, write=False, timeout=_TICK):
                continue
            try:
                chunk = self.client.recv(CHUNK)
            except (BlockingIOError, InterruptedError):
                continue
            if not chunk:
                return None
            data += chunk
        return data

    def close(self) -> None:
        with self.lock:
            self.closed = True
            with contextlib.suppress(OSError):
                self.client.close()
        if self.upstream is not None:
            with contextlib.suppress(OSError):
                self.upstream.close()

    def _nodelay(self, sock: socket.socket) -> None:
        # Small writes (HTTP headers, latency probes) must not wait for Nagle.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _connect(self) -> socket.socket | None:
        host, port = self.proxy.target
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[
                0
            ]
            sock = socket.socket(family, kind, proto)
        except OSError:
            return None
        try:
            sock.setblocking(False)
            err = sock.connect_ex(addr)
            if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                sock.close()
                return None
            deadline = time.monotonic() + _CONNECT_TIMEOUT_S
            while not _ready(sock, self.proxy._wake_r, write=True, timeout=_TICK):
                if self.proxy._stop.is_set() or time.monotonic() > deadline:
                    sock.close()
                    return None
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                sock.close()
                return None
        except OSError:
            sock.close()
            return None
        self._nodelay(sock)
        return sock

    def _done(self) -> bool:
        if self.proxy._stop.is_set() or self.closed:
            return True
        # Blackhole switched off: connections it swallowed are closed, not resumed.
        return self.blackholed and not self.proxy._blackhole

    def _swallowing(self) -> bool:
        if self.proxy._blackhole:
            self.blackholed = True
        return self.blackholed

    def _drain(self) -> None:
        """Read and discard from the client until it closes or the blackhole ends."""
        try:
            while not self._done():
                if not _ready(self.client, self.proxy._wake_r, write=False, timeout=_TICK):
                    continue
                try:
                    if not self.client.recv(CHUNK):
                        return
                except (BlockingIOError, InterruptedError):
                    continue
        except (OSError, ValueError):
            return

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        """Forward ``src`` to ``dst`` until EOF, error, reset, or stop."""
        try:
            while not self._done():
                if not _ready(src, self.proxy._wake_r, write=False, timeout=_TICK):
                    continue
                try:
                    data = src.recv(CHUNK)
                except (BlockingIOError, InterruptedError):
                    continue
                if not data:
                    # Half-close: pass the FIN on and keep the other direction running.
                    if not self._swallowing():
                        with contextlib.suppress(OSError):
                            dst.shutdown(socket.SHUT_WR)
                    return
                if self._swallowing():
                    continue
                cut = self.proxy._reset_cut(self, len(data)) if upstream else None
                if cut is not None:
                    data = data[:cut]
                latency = self.proxy._latency
                if latency > 0 and self.proxy._stop.wait(latency):
                    return
                if cut is not None:
                    if data:
                        self._send(dst, data)
                    self._reset_connection()
                    return
                if self._swallowing():
                    continue
                if not self._send(dst, data):
                    return
        except (OSError, ValueError):
            # Either side reset or went away: take the whole connection down.
            self._fail()

    def _send(self, dst: socket.socket, data: bytes) -> bool:
        """Send all of ``data``; False when the connection is finished instead."""
        view = memoryview(data)
        while view:
            if self._done():
                return False
            if self._swallowing():
                return True
            if not _ready(dst, self.proxy._wake_r, write=True, timeout=_TICK):
                continue
            with self.lock:
                if self.closed:
                    return False
                try:
                    sent = dst.send(view)
                except (BlockingIOError, InterruptedError):
                    continue
            view = view[sent:]
        return True

    def _reset_connection(self) -> None:
        with self.lock:
            self.closed = True
            _reset(self.client)
        if self.upstream is not None:
            # shutdown, not close: the server->client thread may still be polling it,
            # and this wakes it; _run closes it after joining that thread.
            with contextlib.suppress(OSError):
                self.upstream.shutdown(socket.SHUT_RDWR)

    def _fail(self) -> None:
        with self.lock:
            self.closed = True
        for sock in (self.client, self.upstream):
            if sock is not None:
                with contextlib.suppress(OSError, ValueError):
                    sock.shutdown(socket.SHUT_RDWR)
