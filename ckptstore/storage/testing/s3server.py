"""A real S3-compatible server for the tests: moto in server mode, as its own process.

s3fs talks to it over HTTP on 127.0.0.1 exactly as it talks to AWS or MinIO; nothing in
boto is mocked. The session fixture in ``conftest.py`` starts one server for the whole
run and stops it at the end; each test gets a fresh bucket. The server also ends when
the process that started it dies without stopping it (SIGTERM, SIGKILL): it watches its
parent process id.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

# Credentials the tests use. The secret doubles as a canary: it must never appear in a
# log line, an exception, a manifest or any file ckptstore writes.
ACCESS_KEY = "ckptstore-test-access-key"
SECRET_KEY = "CANARY-SECRET-9f3c1e7a-do-not-log"


# Runs moto's server beside a thread that ends it once its parent process is gone (the
# parent id changes). Not PR_SET_PDEATHSIG: that fires when the parent *thread* that
# started it ends, which a server started from a worker thread would not survive.
# The server binds its socket itself (port 0: the kernel picks a free one) and then
# prints the port it got, so no other process can take the port between a choice and
# the bind (tests run on several workers, each starting servers).
_LAUNCH = """
import os, sys, threading, time
parent, port = int(sys.argv[1]), int(sys.argv[2])
def watch():
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication, MotoRequestHandler, create_backend_app)
from werkzeug.serving import make_server
server = make_server("127.0.0.1", port, DomainDispatcherApplication(create_backend_app),
                     threaded=True, request_handler=MotoRequestHandler)
port = server.server_address[1]
os.environ["MOTO_PORT"] = str(port)  # (as moto's own command line sets it)
print(port, flush=True)
null = os.open(os.devnull, os.O_WRONLY)
os.dup2(null, 1)
server.serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    """One moto server process on 127.0.0.1, on ``port`` (0: a free one, the default;
    ``start`` sets it to the one the server bound)."""

    port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> S3Server:
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, str(os.getpid()), str(self.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        assert self.proc.stdout is not None
        out = self.proc.stdout
        # The server prints its port once it listens (the socket is bound and
        # listening before make_server returns); nothing else comes on stdout.
        try:
            ready, _, _ = select.select([out], [], [], timeout_s)
            line = out.readline() if ready else b""
            if not line.strip().isdigit():
                code: int | None = None
                if ready:  # end of file: it exited (or printed something else)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        code = self.proc.wait(1)
                self.stop()  # (before the pipe closes: a late print must not fail it)
                if code is not None:
                    raise RuntimeError(f"moto server exited at start-up with {code}")
                raise RuntimeError(f"moto server did not start listening in {timeout_s:g} s")
        finally:
            out.close()
        self.port = int(line)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def options(self, endpoint: str | None = None, **extra: Any) -> dict[str, Any]:
        """``storage_options`` for s3fs pointing at this server (or at ``endpoint``)."""
        return {
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "endpoint_url": endpoint or self.endpoint,
            "client_kwargs": {"region_name": "us-east-1"},
            **extra,
        }

    def client_env(self) -> dict[str, str]:
        """Environment variables that point an AWS SDK in a subprocess at this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def fs(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.options())

    def call(self, method: str, **kwargs: Any) -> Any:
        """One raw S3 API call (for set-up and for checks the API under test cannot do)."""
        from fsspec.asyn import sync

        fs = self.fs()
        return sync(fs.loop, fs._call_s3, method, **kwargs)

    def new_bucket(self) -> str:
        name = f"test-{uuid.uuid4().hex[:16]}"
        self.call("create_bucket", Bucket=name)
        return name

    def open_uploads(self, bucket: str) -> list[dict[str, Any]]:
        """Multipart uploads started and neither completed nor aborted."""
        return list(self.call("list_multipart_uploads", Bucket=bucket).get("Uploads", []))
