"""S3 (AWS, MinIO, R2, any S3-compatible service) through s3fs: multipart, conditional commit.

What the generic object-store backend (:mod:`ckptstore.storage.objectstore`) does, plus:

* **Bounded, parallel multipart uploads, few requests.** A file is cut into parts as
  it is written: ``part_bytes`` at first, doubling every two parts up to
  ``max_part_bytes`` (a copy, whose size is known, uses equal parts of half that or
  more), so a 2 GiB shard takes 21 parts written directly, 32 copied, instead of 128 at
  16 MiB (issue 17's bound: size / 64 MiB). Parts upload on s3fs's event loop while
  the writer goes on, ``parts_in_flight`` of ``part_bytes`` at once, or two larger
  ones: one file holds at most 384 MiB with the defaults (``max_part_bytes`` lowers it). The object appears under its key only when
  ``CompleteMultipartUpload`` succeeds; any failure aborts the upload, so no partial
  object is ever published (s3fs's own ``fs.open(..., "wb")`` publishes the truncated
  object when an exception interrupts it). A file smaller than one part is one PUT.
* **Conditional commit.** ``manifest.json`` is created with ``If-None-Match: *``: of two
  writers committing the same name, S3 lets exactly one win (412 for the other). A
  server that does not implement it falls back to check-then-put, with a warning once.
* **Back-off when throttled.** S3 answers ``503 SlowDown`` when a prefix takes more
  requests than it serves (1,000 ranks putting parts under one checkpoint): botocore
  and s3fs retry a few times; the calls made here (parts, PUTs, multipart starts and
  completions) then go on asking, after pauses that double from about 0.5 s with
  jitter, up to :data:`THROTTLE_RETRIES` more times.
* **Checksums the store checks.** Every part and every small PUT carries its CRC32
  (``x-amz-checksum-crc32``, computed here; botocore would otherwise compute the same
  one itself), which S3 checks against the bytes it received, refusing a part that
  differs; the sink then compares the checksum the store reports for each part with
  its own (:attr:`_MultipartSink.confirmed`). A copy to a store that is seen to refuse
  a wrong checksum (:meth:`S3Backend.checks_uploads`: one probe PUT per backend) skips
  reading every file back; any other store (moto, some S3-compatible servers, which
  accept or ignore the header) is still read back.
* **Sweep** also aborts multipart uploads under the root that this process did not
  start and that are older than the grace period (they stay billed and invisible).
* **check_access** asks for the bucket once, so a missing bucket or wrong credentials
  fail at start-up with a message that says what to fix, not at the first save.

Reads go through :class:`~ckptstore.storage.s3_reader.S3Reader` (a window cache, and
one-GET streams for copies); the settings, their defaults and their validation are in
:mod:`ckptstore.storage.s3_options`.

Credentials stay inside the s3fs file system object; nothing here logs or formats
``storage_options``, and errors are built from S3's error code and the object path.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import itertools
import logging
import random
import threading
import time
import uuid
import zlib
from concurrent.futures import Future
from typing import Any

from ckptstore.crashpoints import crash_point
from ckptstore.errors import ManifestExistsError, StorageError
from ckptstore.storage.base import Capabilities, FileSink, RangeReader, StorageBackend
from ckptstore.storage.objectstore import (
    FsspecBackend,
    filesystem_from_url,
    translate_error,
)
from ckptstore.storage.s3_options import (
    DEFAULT_CALL_TIMEOUT_S,
    DEFAULT_MAX_PART_BYTES,
    DEFAULT_PART_BYTES,
    DEFAULT_PARTS_IN_FLIGHT,
    MAX_PARTS,
    MIN_PART_BYTES,
    check_upload_options,
    client_config,
    merge_client_config,
    with_client_config,
)
from ckptstore.storage.s3_reader import S3Reader

__all__ = ["MIN_PART_BYTES", "S3Backend", "S3Reader", "is_s3", "open_s3_backend"]

log = logging.getLogger("ckptstore")


# Multipart uploads started by this process and not finished: sweep() leaves them alone.
_LIVE_UPLOADS: set[str] = set()
# Uploads whose abort failed (the server was unreachable): aborted again later.
_ORPHANS: list[tuple[str, str, str]] = []
_LIVE_LOCK = threading.Lock()


# What S3 and S3-compatible servers answer to a body whose checksum header does not match.
_CHECKSUM_REFUSED = ("BadDigest", "XAmzContentChecksumMismatch", "InvalidDigest")


# S3's answers when a prefix takes more requests than it serves: asked again, after a
# growing, jittered pause (botocore and s3fs retry first; these calls go on after them).
_THROTTLED = ("SlowDown", "503", "ServiceUnavailable", "Throttling", "RequestLimitExceeded")
THROTTLE_RETRIES = 6  # pauses of about 0.5, 1, 2, 4, 8, 16 s (jittered): ~30 s more in all


def _back_off(exc: Exception, attempt: int, what: str) -> None:
    """Return after a pause if ``exc`` is S3 throttling and ``attempt`` may be retried;
    else raise ``exc``."""
    throttled = _code(exc) in _THROTTLED or getattr(exc, "errno", None) == errno.EBUSY
    if not throttled or attempt >= THROTTLE_RETRIES:
        raise exc
    pause = 0.5 * 2**attempt * random.uniform(0.5, 1.5)
    log.info("%s: throttled by the store (%s); asking again in %.1f s", what, _code(exc), pause)
    time.sleep(pause)


def _checksum_args(data: bytes | None) -> dict[str, str]:
    """The algorithm (to start a multipart upload), and ``data``'s CRC32 if given."""
    if data is None:
        return {"ChecksumAlgorithm": "CRC32"}
    return {"ChecksumAlgorithm": "CRC32", "ChecksumCRC32": _crc32(data)}


def _crc32(data: bytes) -> str:
    """S3's ``x-amz-checksum-crc32``: the big-endian CRC32, base64."""
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def open_s3_backend(
    url: str, *, storage_options: dict[str, Any], backend_options: dict[str, Any], create: bool
) -> StorageBackend:
    """The backend for an ``s3://`` / ``s3a://`` URL (``open_backend``'s factory).

    Listings are never cached (a cached one hides another rank's or process's commit).
    ``create`` does not apply: a bucket is never created.
    """
    del create
    options = dict(storage_options)
    options.setdefault("use_listings_cache", False)
    config = client_config(
        connect_timeout_s=backend_options.get("connect_timeout_s"),
        read_timeout_s=backend_options.get("read_timeout_s"),
        request_retries=backend_options.get("request_retries"),
    )
    if config:
        given = options.get("config_kwargs") or {}
        options["config_kwargs"] = merge_client_config(dict(given), config)
    fs, root = filesystem_from_url(url, options)
    if is_s3(fs):
        return S3Backend(fs, root, url, **backend_options)
    if backend_options:
        raise ValueError(
            f"backend options {sorted(backend_options)} are for S3; {url!r} opened "
            f"{type(fs).__name__}, which takes none"
        )
    return FsspecBackend(fs, root, url)


def is_s3(fs: Any) -> bool:
    protocol = getattr(fs, "protocol", ())
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    return any(p in ("s3", "s3a") for p in protocols)


def _code(exc: BaseException) -> str:
    """S3's error code ("NoSuchBucket", "AccessDenied", ...) from an s3fs/botocore error."""
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", ""))
    return ""


class _MultipartSink(FileSink):
    """One object written front to back: one PUT if small, else a bounded multipart upload."""

    def __init__(self, backend: S3Backend, path: str, size_hint: int | None = None) -> None:
        self._backend = backend
        self.path = path
        self._bucket, self._key, _ = backend.fs.split_path(path)
        self._part_bytes = backend.part_bytes
        self._size_hint = size_hint
        self._buf = bytearray()
        self._size = 0
        self._upload_id: str | None = None
        self._inflight: list[tuple[int, Future[Any], dict[str, Any]]] = []
        self._parts: list[dict[str, Any]] = []
        self._closed = False
        # Every part's (or the one PUT's) checksum, as reported by the store, matched
        # the one computed here; False if the store reported none for one of them.
        self.confirmed = True
        self._with_crc = False  # this upload's parts carry CRC32s

    # -- talking to S3 on s3fs's event loop ----------------------------------------
    def _submit(self, method: str, **kwargs: Any) -> Future[Any]:
        return self._backend._submit(self._backend.fs._call_s3(method, **kwargs))

    def _call(self, method: str, **kwargs: Any) -> Any:
        return self._backend._call(method, **kwargs)

    # -- FileSink ----------------------------------------------------------------------
    def write(self, data: Any) -> None:
        mv = memoryview(data)
        if mv.nbytes == 0:
            return
        self._buf += mv.cast("B") if mv.c_contiguous else mv.tobytes()
        self._size += mv.nbytes
        while len(self._buf) >= (n := self._next_part_bytes()):
            part = bytes(self._buf[:n])
            del self._buf[:n]
            self._send_part(part)

    def _next_part_bytes(self) -> int:
        """Parts grow to ``max_part_bytes``, so that a large file takes few requests
        (each PUT costs; S3 allows 3,500 a second per prefix): of a known size, equal
        parts of half that to all of it; of an unknown one, ``part_bytes`` doubling every
        two parts."""
        base, top = self._part_bytes, max(self._part_bytes, self._backend.max_part_bytes)
        if self._size_hint is not None:
            parts = max(1, self._size_hint // max(base, top // 2))
            return max(base, -(-self._size_hint // parts))
        sent = len(self._parts) + len(self._inflight)
        return min(top, base << min(16, sent // 2))

    def tell(self) -> int:
        return self._size

    def _send_part(self, part: bytes) -> None:
        try:
            if self._upload_id is None:
                response, self._with_crc = self._backend.call_with_checksum(
                    "create_multipart_upload", None, Bucket=self._bucket, Key=self._key
                )
                self._upload_id = str(response["UploadId"])
                with _LIVE_LOCK:
                    _LIVE_UPLOADS.add(self._upload_id)
            number = len(self._parts) + len(self._inflight) + 1
            if number > MAX_PARTS:
                raise StorageError(
                    f"{self.path}: more than {MAX_PARTS} parts; raise part_bytes "
                    f"(now {self._part_bytes} B)"
                )
            # parts_in_flight base-sized parts' bytes in flight, or two larger parts.
            most = self._backend.parts_in_flight
            room = min(most, max(2, most * self._part_bytes // max(1, len(part))))
            while len(self._inflight) >= room:
                self._finish_oldest()
            crc = _checksum_args(part) if self._with_crc else {}
            args = dict(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=part,
                **crc,
            )
            self._inflight.append((number, self._submit("upload_part", **args), args))
        except StorageError:
            raise
        except Exception as exc:
            raise translate_error(exc, "upload", self.path) from exc

    def _finish_oldest(self) -> None:
        number, fut, args = self._inflight.pop(0)
        for attempt in itertools.count():
            try:
                response = fut.result(timeout=self._backend.call_timeout_s)
                break
            except Exception as exc:
                _back_off(exc, attempt, f"{self.path} part {number}")
                fut = self._submit("upload_part", **args)
        crc = args.get("ChecksumCRC32")
        part = {"PartNumber": number, "ETag": response["ETag"]}
        if crc is not None:
            part["ChecksumCRC32"] = crc
        self._confirm(crc, response, f"part {number}")
        self._parts.append(part)

    def _confirm(self, sent: str | None, response: Any, what: str) -> None:
        """Compare the CRC32 the store reports for ``what`` with the one sent."""
        got = response.get("ChecksumCRC32") if isinstance(response, dict) else None
        if sent is None or got is None:
            self.confirmed = False
        elif got != sent:
            raise StorageError(
                f"{self.path}: the store reports CRC32 {got} for {what}, {sent} was sent"
            )

    def close(self) -> int:
        if self._closed:
            return self._size
        try:
            if self._upload_id is None:
                body = bytes(self._buf)
                response, with_crc = self._backend.call_with_checksum(
                    "put_object", body, Bucket=self._bucket, Key=self._key, Body=body
                )
                self._confirm(_crc32(body) if with_crc else None, response, "the object")
            else:
                if self._buf or (not self._parts and not self._inflight):
                    self._send_part(bytes(self._buf))
                while self._inflight:
                    self._finish_oldest()
                crash_point("s3.upload.before_complete")
                self._call(
                    "complete_multipart_upload",
                    Bucket=self._bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": sorted(self._parts, key=lambda p: p["PartNumber"])},
                )
                self._forget_upload()
            self._backend.fs.invalidate_cache(self.path)
        except BaseException as exc:
            self.abort()
            if isinstance(exc, StorageError) or not isinstance(exc, Exception):
                raise
            raise translate_error(exc, "upload", self.path) from exc
        self._buf = bytearray()
        self._closed = True
        return self._size

    def abort(self) -> None:
        self._buf = bytearray()
        for _, fut, _ in self._inflight:
            fut.cancel()
        for _, fut, _ in self._inflight:
            with contextlib.suppress(BaseException):
                fut.result(timeout=self._backend.call_timeout_s)
        self._inflight = []
        if self._upload_id is not None:
            try:
                self._call(
                    "abort_multipart_upload",
                    Bucket=self._bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                )
            except Exception:
                with _LIVE_LOCK:
                    _ORPHANS.append((self._bucket, self._key, self._upload_id))
            self._forget_upload()

    def _forget_upload(self) -> None:
        with _LIVE_LOCK:
            _LIVE_UPLOADS.discard(self._upload_id or "")
        self._upload_id = None


class S3Backend(FsspecBackend):
    """A prefix in an S3 bucket, through an ``s3fs.S3FileSystem``.

    ``fs``, ``root``, ``url``: as for :class:`FsspecBackend` (``fs`` an s3fs file
    system). The keyword arguments, also accepted as ``open_backend(...,
    backend_options={...})``, are validated here; their defaults are the values
    ckptstore has always used:

    ``part_bytes`` (16 MiB, at least S3's 5 MiB)
        size of the first multipart parts; a file smaller than one part is one PUT.
    ``max_part_bytes`` (128 MiB)
        the largest part (see the module doc).
    ``parts_in_flight`` (4)
        ``part_bytes``-sized parts of one file uploading at once (two, of larger
        parts); one file holds at most those plus one part.
    ``call_timeout_s`` (600)
        how long one S3 call ckptstore makes itself may take in all, retries included.
    ``connect_timeout_s``, ``read_timeout_s``, ``request_retries`` (None)
        botocore's connect and read timeouts of one HTTP request and how often it
        retries one (``config_kwargs`` ``connect_timeout``, ``read_timeout``,
        ``retries={"max_attempts": n}``). None leaves the file system's setting: what
        ``storage_options["config_kwargs"]`` says, else s3fs's 5 s connect and 15 s read
        timeouts and botocore's default retries. A setting the given ``fs`` does not
        have already is applied to a private copy of it, never to the shared instance
        that fsspec caches (``open_backend`` instead asks fsspec for a file system with
        them, so it is cached like any other storage option).
    """

    def __init__(
        self,
        fs: Any,
        root: str,
        url: str,
        *,
        part_bytes: int = DEFAULT_PART_BYTES,
        max_part_bytes: int = DEFAULT_MAX_PART_BYTES,
        parts_in_flight: int = DEFAULT_PARTS_IN_FLIGHT,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        connect_timeout_s: float | None = None,
        read_timeout_s: float | None = None,
        request_retries: int | None = None,
    ) -> None:
        config = client_config(
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            request_retries=request_retries,
        )
        check_upload_options(part_bytes, parts_in_flight, call_timeout_s)
        check_upload_options(max_part_bytes, parts_in_flight, call_timeout_s)
        super().__init__(with_client_config(fs, config), root, url)
        self.part_bytes = part_bytes
        self.max_part_bytes = max_part_bytes
        self.parts_in_flight = parts_in_flight
        self.call_timeout_s = float(call_timeout_s)
        self._conditional = True  # the server honours If-None-Match (until it says not)
        self._checksums = True  # send CRC32s (until the server refuses the header)
        self._checks: bool | None = None  # the store refuses a wrong CRC32 (probed once)
        self._checks_lock = threading.Lock()  # copy threads ask at once
        self.bucket = self.fs.split_path(self.root)[0]

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            conditional_put=self._conditional,
            multipart_uploads=True,
            streaming_reads=True,
        )

    # Everything S3 runs as coroutines on s3fs's event loop, called from our threads.
    def _submit(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.fs.loop)

    def _run(self, coro: Any) -> Any:
        return self._submit(coro).result(timeout=self.call_timeout_s)

    def _call(self, method: str, **kwargs: Any) -> Any:
        for attempt in itertools.count():
            try:
                return self._run(self.fs._call_s3(method, **kwargs))
            except Exception as exc:
                _back_off(exc, attempt, f"{self.url}: {method}")
        raise AssertionError("unreachable")

    def create_sink(self, path: str, size_hint: int | None = None) -> FileSink:
        return _MultipartSink(self, path, size_hint)

    def call_with_checksum(
        self, method: str, data: bytes | None, **kwargs: Any
    ) -> tuple[Any, bool]:
        """``method`` with checksum arguments (the algorithm, to start a multipart
        upload; with ``data``, also its CRC32), and whether they were sent: a server
        that refuses them is asked again without, and never again (a warning, once)."""
        if self._checksums:
            try:
                return self._call(method, **kwargs, **_checksum_args(data)), True
            except Exception as exc:
                if _code(exc) not in ("NotImplemented", "InvalidArgument", "InvalidRequest"):
                    raise
                log.warning(
                    "%s does not take S3 checksums (x-amz-checksum-crc32: %s); uploads "
                    "go without, and copies are read back",
                    self.url,
                    _code(exc),
                )
                self._checksums = False
        return self._call(method, **kwargs), False

    def checks_uploads(self) -> bool:
        """Whether the store refuses a part whose CRC32 does not match its bytes; then
        a sink whose parts' checksums it confirmed needs no read-back. Asked once, with
        one PUT of a few bytes under a checksum that does not match: refused by S3
        (``BadDigest``); a store that accepts it is deleted from again and is read back
        after every copy."""
        with self._checks_lock:
            if self._checks is None:
                self._checks = self._probe_checksums()
        return self._checks

    def _probe_checksums(self) -> bool:
        """Put a few bytes under a CRC32 that does not match them: True if refused."""
        if not self._checksums:
            return False
        key = f"{self._prefix()}.ckptstore-checksum-probe-{uuid.uuid4().hex[:12]}"
        args = _checksum_args(b"not this")
        try:
            self._call("put_object", Bucket=self.bucket, Key=key, Body=b"probe", **args)
        except Exception as exc:
            if _code(exc) in _CHECKSUM_REFUSED:
                return True
            log.info("%s: checksum probe failed (%s); copies are read back", self.url, exc)
            return False
        with contextlib.suppress(Exception):
            self._call("delete_object", Bucket=self.bucket, Key=key)
        return False

    def open_reader(self, name: str) -> RangeReader:
        return S3Reader(self.fs, self.store_path(name), self._run)

    def create_manifest(self, path: str, data: bytes) -> None:
        bucket, key, _ = self.fs.split_path(path)
        if self._conditional:
            try:
                self._call("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                self.fs.invalidate_cache(path)
                return
            except FileExistsError:  # s3fs's word for 412 Precondition Failed
                raise ManifestExistsError(path) from None
            except Exception as exc:
                if _code(exc) not in ("NotImplemented", "InvalidArgument", "InvalidRequest"):
                    raise
                log.warning(
                    "%s does not support conditional writes (If-None-Match); committing with "
                    "check-then-put, which cannot stop two writers racing on one name",
                    self.url,
                )
                self._conditional = False
        super().create_manifest(path, data)

    def put_atomic(self, name: str, data: bytes) -> None:
        bucket, key, _ = self.fs.split_path(self.store_path(name))
        try:
            self._call("put_object", Bucket=bucket, Key=key, Body=data)
        except Exception as exc:
            raise translate_error(exc, "replace", self.store_path(name)) from exc
        self.fs.invalidate_cache(self.store_path(name))

    def check_access(self) -> None:
        try:
            self._call("head_bucket", Bucket=self.bucket)
            self._call("list_objects_v2", Bucket=self.bucket, Prefix=self._prefix(), MaxKeys=1)
        except Exception as exc:
            code = _code(exc)
            if isinstance(exc, FileNotFoundError) or code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(
                    f"bucket {self.bucket!r} of {self.url} does not exist (or is not visible "
                    "to these credentials): create it first, or check the URL and endpoint"
                ) from None
            if isinstance(exc, PermissionError) or code in (
                "403",
                "AccessDenied",
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "Forbidden",
            ):
                raise StorageError(
                    f"access to {self.url} was denied ({code or 'forbidden'}): check the "
                    "credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or "
                    "storage_options key/secret) and that they may read and write this bucket"
                ) from None
            raise translate_error(exc, "reach", self.url) from exc

    def _prefix(self) -> str:
        key = self.fs.split_path(self.root)[1]
        return f"{key}/" if key else ""

    def open_uploads(self) -> list[dict[str, Any]]:
        """Multipart uploads under the root that were neither completed nor aborted."""
        out: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._prefix()}
        while True:
            response = self._call("list_multipart_uploads", **kwargs)
            out += response.get("Uploads", [])
            if not response.get("IsTruncated"):
                return out
            kwargs["KeyMarker"] = response.get("NextKeyMarker", "")
            kwargs["UploadIdMarker"] = response.get("NextUploadIdMarker", "")

    def abort_orphans(self) -> int:
        """Abort again the uploads whose abort failed earlier; return how many are left."""
        with _LIVE_LOCK:
            todo = [o for o in _ORPHANS if o[0] == self.bucket]
        for bucket, key, upload_id in todo:
            try:
                self._call("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
            except FileNotFoundError:
                pass  # NoSuchUpload: already gone
            except Exception:
                continue
            with _LIVE_LOCK:
                _ORPHANS.remove((bucket, key, upload_id))
        with _LIVE_LOCK:
            return sum(1 for o in _ORPHANS if o[0] == self.bucket)

    def sweep(self, grace_s: float) -> list[str]:
        self.abort_orphans()
        removed = super().sweep(grace_s)
        now = time.time()
        try:
            uploads = self.open_uploads()
        except Exception as exc:
            log.warning("could not list open multipart uploads under %s: %s", self.url, exc)
            return removed
        for upload in uploads:
            with _LIVE_LOCK:
                live = upload["UploadId"] in _LIVE_UPLOADS
            initiated: Any = upload.get("Initiated")
            started = float(initiated.timestamp()) if initiated is not None else now
            if live or now - started < grace_s:
                continue
            with contextlib.suppress(Exception):
                self._call(
                    "abort_multipart_upload",
                    Bucket=self.bucket,
                    Key=upload["Key"],
                    UploadId=upload["UploadId"],
                )
                removed.append(f"multipart upload of {upload['Key']}")
        return removed
