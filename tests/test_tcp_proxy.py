"""Tests for the fault-injecting loopback proxy in tests/tcp_proxy.py."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import socketserver
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from tcp_proxy import FaultProxy

# ---------------------------------------------------------------------------------
# servers behind the proxy


class _EchoHandler(socketserver.BaseRequestHandler):
    """Echo every byte back as it arrives."""

    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass  # the proxy reset or closed us; that is the point of most tests


class _DigestHandler(socketserver.BaseRequestHandler):
    """Read until the client half-closes, then answer with the sha256 of what came."""

    def handle(self) -> None:
        digest = hashlib.sha256()
        try:
            while data := self.request.recv(65536):
                digest.update(data)
            self.request.sendall(digest.digest())
        except OSError:
            pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    # The default backlog of 5 drops SYNs when many connections arrive together, and the
    # client's retransmit then costs a whole second.
    request_queue_size = 128


def _serve(handler: type[socketserver.BaseRequestHandler]) -> Iterator[int]:
    srv = _Server(("127.0.0.1", 0), handler)
    t = threading.Thread(
        target=srv.serve_forever, kwargs={"poll_interval": 0.05}, name="test-server", daemon=True
    )
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


@pytest.fixture
def echo_port() -> Iterator[int]:
    yield from _serve(_EchoHandler)


@pytest.fixture
def proxy(echo_port: int) -> Iterator[FaultProxy]:
    with FaultProxy(echo_port) as p:
        yield p


@pytest.fixture(autouse=True)
def _no_proxy_threads() -> Iterator[None]:
    # Autouse, so torn down after the proxy fixture: stop() itself must have joined them.
    yield
    alive = [t.name for t in threading.enumerate() if t.name.startswith("tcpproxy-")]
    assert not alive, f"proxy threads outlived stop(): {alive}"


# ---------------------------------------------------------------------------------
# helpers


def _connect(proxy: FaultProxy, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


def _assert_closed(sock: socket.socket, timeout: float = 2.0) -> None:
    """The proxy closed (FIN) or reset (RST) this connection."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(100)
    except ConnectionResetError:
        return
    assert data == b""


def _ping_pong(
    sock: socket.socket, total: int, chunk: int = 10_000
) -> tuple[int, BaseException | None]:
    """Send ``total`` bytes in chunks, each echoed back before the next goes. Return the
    bytes echoed back and the error that cut it short: a reset, or EOFError for a close."""
    received = 0
    try:
        while received < total:
            n = min(chunk, total - received)
            payload = os.urandom(n)
            sock.sendall(payload)
            got = bytearray()
            while len(got) < n:
                data = sock.recv(n - len(got))
                if not data:
                    raise EOFError("closed")
                got += data
                received += len(data)
            assert bytes(got) == payload
    except (ConnectionResetError, BrokenPipeError, EOFError) as e:
        return received, e
    return received, None


def _echo(sock: socket.socket, total: int, chunk: int = 10_000) -> int:
    received, err = _ping_pong(sock, total, chunk)
    assert err is None, f"{err!r} after {received} bytes"
    return received


# ---------------------------------------------------------------------------------
# plain forwarding


def test_forwards_5mb_round_trip_intact(proxy: FaultProxy) -> None:
    payload = os.urandom(5 * 1024 * 1024)
    errors: list[BaseException] = []
    with _connect(proxy) as sock:

        def send() -> None:
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                errors.append(e)

        sender = threading.Thread(target=send, name="test-sender")
        sender.start()
        buf = bytearray()
        while data := sock.recv(1 << 20):
            buf += data
        sender.join(5)
    assert not errors
    assert len(buf) == len(payload)
    assert buf == payload
    assert proxy.connections == 1
    assert proxy.resets == 0


def test_half_close_is_forwarded() -> None:
    # The server answers only after seeing EOF: works only if the proxy forwards the
    # client's SHUT_WR and keeps the server->client direction open.
    payload = os.urandom(2 * 1024 * 1024)
    for port in _serve(_DigestHandler):
        with FaultProxy(port) as p, _connect(p) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            answer = _recv_exact(sock, 32)
            assert sock.recv(1) == b""  # and the server's close comes through too
        assert answer == hashlib.sha256(payload).digest()


def test_many_concurrent_connections(proxy: FaultProxy) -> None:
    results: list[int] = []
    lock = threading.Lock()

    def client() -> None:
        with _connect(proxy) as sock:
            n = _echo(sock, 200_000, chunk=20_000)
        with lock:
            results.append(n)

    threads = [threading.Thread(target=client, name=f"test-client-{i}") for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [200_000] * 16
    assert proxy.connections == 16


# ---------------------------------------------------------------------------------
# latency


def test_latency_delays_each_direction_and_clears(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        assert _echo(sock, 100, chunk=100) == 100  # connection up before the fault
        proxy.set_latency(0.2)  # applies to an existing connection too
        t0 = time.monotonic()
        _echo(sock, 100, chunk=100)
        elapsed = time.monotonic() - t0
        # One chunk each way, each held 0.2 s.
        assert 0.4 <= elapsed < 2.0, elapsed

        proxy.clear()
        t0 = time.monotonic()
        _echo(sock, 100, chunk=100)
        assert time.monotonic() - t0 < 0.3  # well under one 0.4 s latency round trip


# ---------------------------------------------------------------------------------
# reset_after


def test_reset_after_threshold_then_next_connection_works(proxy: FaultProxy) -> None:
    proxy.reset_after(25_000)
    with _connect(proxy) as sock:
        received, err = _ping_pong(sock, 1_000_000)
    assert err is not None, "connection was not reset"
    # 10 kB chunks: the first two round-trip whole, the third is cut at 25 kB.
    assert isinstance(err, (ConnectionResetError, BrokenPipeError, EOFError))
    assert 20_000 <= received <= 25_000
    assert proxy.resets == 1

    # times=1 is used up: the next connection goes well past the threshold.
    with _connect(proxy) as sock:
        assert _echo(sock, 200_000) == 200_000
    assert proxy.resets == 1
    assert proxy.connections == 2


def test_reset_is_an_rst(proxy: FaultProxy) -> None:
    # An RST (not a FIN) makes the client's recv raise rather than return b"".
    proxy.reset_after(5)
    got = b""
    with _connect(proxy) as sock:
        sock.sendall(b"0123456789")
        with pytest.raises(ConnectionResetError):  # noqa: PT012
            # The echo of the 5 bytes that went through may beat the RST (about 1 in 40).
            while data := sock.recv(100):
                got += data
    assert got in (b"", b"01234")
    assert proxy.resets == 1


def test_reset_after_times_two(proxy: FaultProxy) -> None:
    proxy.reset_after(15_000, times=2)
    for expected in (1, 2):
        with _connect(proxy) as sock:
            _, err = _ping_pong(sock, 100_000)
        assert err is not None
        assert proxy.resets == expected
    with _connect(proxy) as sock:
        assert _echo(sock, 100_000) == 100_000
    assert proxy.resets == 2


def test_reset_counts_from_when_armed(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        assert _echo(sock, 50_000) == 50_000
        proxy.reset_after(25_000)  # 50 kB already went through; count starts now
        received, err = _ping_pong(sock, 1_000_000)
    assert err is not None
    assert 20_000 <= received <= 25_000
    assert proxy.resets == 1


def test_reset_only_hits_connections_reaching_threshold(proxy: FaultProxy) -> None:
    proxy.reset_after(50_000)
    with _connect(proxy) as short, _connect(proxy) as long:
        assert _echo(short, 40_000) == 40_000  # below threshold: untouched
        _, err = _ping_pong(long, 1_000_000)
        assert err is not None
        assert _echo(short, 100_000) == 100_000  # fault used up by `long`
    assert proxy.resets == 1


# ---------------------------------------------------------------------------------
# blackhole


def test_blackhole_new_connection_never_answers_then_clear(proxy: FaultProxy) -> None:
    proxy.blackhole()
    with _connect(proxy, timeout=0.5) as sock:
        sock.sendall(b"hello?")
        with pytest.raises(TimeoutError):
            sock.recv(100)
        assert proxy.connections == 1

        proxy.clear()
        # The swallowed connection is closed, not resumed...
        _assert_closed(sock)
    # ...and a new one works.
    with _connect(proxy) as sock:
        assert _echo(sock, 50_000) == 50_000


def test_blackhole_stops_existing_connection(proxy: FaultProxy) -> None:
    with _connect(proxy, timeout=0.5) as sock:
        assert _echo(sock, 10_000) == 10_000
        proxy.blackhole()
        sock.sendall(b"still there?")
        with pytest.raises(TimeoutError):
            sock.recv(100)
    proxy.blackhole(False)
    with _connect(proxy) as sock:
        assert _echo(sock, 10_000) == 10_000


# ---------------------------------------------------------------------------------
# refuse


def _connect_and_recv_fails(proxy: FaultProxy) -> None:
    # The kernel completes the handshake before the proxy resets, so connect usually
    # succeeds and recv sees the reset; but with a timeout set, connect itself polls for
    # completion and can see the RST first.
    try:
        sock = _connect(proxy, timeout=2.0)
    except ConnectionResetError:
        return
    with sock:
        _assert_closed(sock)


def test_refuse_resets_new_connections(proxy: FaultProxy) -> None:
    proxy.refuse()
    _connect_and_recv_fails(proxy)
    _connect_and_recv_fails(proxy)
    assert proxy.connections == 2
    proxy.refuse(False)
    with _connect(proxy) as sock:
        assert _echo(sock, 10_000) == 10_000


def test_upstream_down_resets_client() -> None:
    # Target a port with nothing listening: the proxy resets the client.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    with FaultProxy(dead_port) as p:
        _connect_and_recv_fails(p)


# ---------------------------------------------------------------------------------
# stop


def test_stop_closes_everything_and_joins_threads(echo_port: int) -> None:
    p = FaultProxy(echo_port).start()
    busy = _connect(p)
    assert _echo(busy, 10_000) == 10_000
    p.set_latency(10.0)  # a thread waiting out latency must still stop promptly
    busy.sendall(b"x")
    idle = _connect(p)
    p.blackhole()
    swallowed = _connect(p)
    swallowed.sendall(b"x")
    time.sleep(0.3)  # let the proxy pick them all up

    t0 = time.monotonic()
    p.stop()
    assert time.monotonic() - t0 < 2.0
    assert not [t.name for t in threading.enumerate() if t.name.startswith("tcpproxy-")]
    p.stop()  # idempotent

    for sock in (busy, idle, swallowed):
        _assert_closed(sock)
        sock.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", p.port), timeout=1.0).close()


def test_stop_without_start(echo_port: int) -> None:
    p = FaultProxy(echo_port)
    p.stop()
    p.stop()
    with pytest.raises(RuntimeError):
        p.start()


# ---------------------------------------------------------------------------------
# HTTP through the proxy

_BODY = os.urandom(1024 * 1024)


class _HTTPHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(_BODY)))
        self.end_headers()
        self.wfile.write(_BODY)

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        answer = hashlib.sha256(body).hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _QuietHTTPServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # resets mid-request are expected here


@pytest.fixture
def http_proxy() -> Iterator[FaultProxy]:
    srv = _QuietHTTPServer(("127.0.0.1", 0), _HTTPHandler)
    t = threading.Thread(
        target=srv.serve_forever, kwargs={"poll_interval": 0.05}, name="test-http", daemon=True
    )
    t.start()
    try:
        with FaultProxy(srv.server_address[1]) as p:
            yield p
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


# No ProxyHandler entries: an http_proxy in the environment must not hijack 127.0.0.1.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def test_http_get_and_put_through_proxy(http_proxy: FaultProxy) -> None:
    with _opener.open(f"{http_proxy.url}/blob", timeout=10) as resp:
        assert resp.status == 200
        assert resp.read() == _BODY

    data = os.urandom(1024 * 1024)
    req = urllib.request.Request(f"{http_proxy.url}/blob", data=data, method="PUT")
    with _opener.open(req, timeout=10) as resp:
        assert resp.read().decode() == hashlib.sha256(data).hexdigest()


def test_http_upload_reset_midway(http_proxy: FaultProxy) -> None:
    http_proxy.reset_after(200_000)
    data = os.urandom(1024 * 1024)
    req = urllib.request.Request(f"{http_proxy.url}/blob", data=data, method="PUT")
    with pytest.raises((OSError, http.client.HTTPException)):
        _opener.open(req, timeout=10).close()
    assert http_proxy.resets == 1
    # Disarmed after one: a retry succeeds.
    with _opener.open(req, timeout=10) as resp:
        assert resp.read().decode() == hashlib.sha256(data).hexdigest()
