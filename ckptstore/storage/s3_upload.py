"""Writing one S3 object: :class:`MultipartSink`, with the checksums and the back-off
on throttling its requests use (the backend: :mod:`ckptstore.storage.s3`)."""

from __future__ import annotations

import base64
import contextlib
import errno
import itertools
import logging
import random
import threading
import time
import zlib
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ckptstore.crashpoints import crash_point
from ckptstore.errors import StorageError
from ckptstore.storage.base import FileSink
from ckptstore.storage.objectstore import translate_error
from ckptstore.storage.s3_options import MAX_PARTS

if TYPE_CHECKING:
    from ckptstore.storage.s3 import S3Backend

log = logging.getLogger("ckptstore")


# Multipart uploads started by this process and not finished: sweep() leaves them alone.
LIVE_UPLOADS: set[str] = set()
# Uploads whose abort failed (the server was unreachable): aborted again later.
ORPHANS: list[tuple[str, str, str]] = []
LIVE_LOCK = threading.Lock()


# What S3 and S3-compatible servers answer to a body whose checksum header does not match.
CHECKSUM_REFUSED = ("BadDigest", "XAmzContentChecksumMismatch", "InvalidDigest")


# S3's answers when a prefix takes more requests than it serves: asked again, after a
# growing, jittered pause (botocore and s3fs retry first; these calls go on after them).
THROTTLED = ("SlowDown", "503", "ServiceUnavailable", "Throttling", "RequestLimitExceeded")
# Each attempt is itself retried by botocore and s3fs, so these stay few: pauses of
# 1, 2, 4 and 8 s, each times 0.5-1.5 (at most ~22 s more in all).
THROTTLE_RETRIES = 4


def back_off(exc: Exception, attempt: int, what: str) -> None:
    """Return after a pause if ``exc`` is S3 throttling and ``attempt`` may be retried;
    else raise ``exc``."""
    throttled = error_code(exc) in THROTTLED or getattr(exc, "errno", None) == errno.EBUSY
    if not throttled or attempt >= THROTTLE_RETRIES:
        raise exc
    pause = 2**attempt * random.uniform(0.5, 1.5)
    log.info(
        "%s: throttled by the store (%s); asking again in %.1f s", what, error_code(exc), pause
    )
    time.sleep(pause)


def checksum_args(data: bytes | None) -> dict[str, str]:
    """The algorithm (to start a multipart upload), and ``data``'s CRC32 if given."""
    if data is None:
        return {"ChecksumAlgorithm": "CRC32"}
    return {"ChecksumAlgorithm": "CRC32", "ChecksumCRC32": crc32_b64(data)}


def crc32_b64(data: bytes) -> str:
    """S3's ``x-amz-checksum-crc32``: the big-endian CRC32, base64."""
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def error_code(exc: BaseException) -> str:
    """S3's error code ("NoSuchBucket", "AccessDenied", ...) from an s3fs/botocore error."""
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", ""))
    return ""


class MultipartSink(FileSink):
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
        self._sent = 0  # the bytes of the parts sent
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
        parts of half that to all of it; of an unknown one, or one grown past the size
        hinted (an estimate: an incremental save's), ``part_bytes`` doubling every two
        parts."""
        base, top = self._part_bytes, max(self._part_bytes, self._backend.max_part_bytes)
        if self._size_hint is not None and self._size <= self._size_hint:
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
                with LIVE_LOCK:
                    LIVE_UPLOADS.add(self._upload_id)
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
            crc = checksum_args(part) if self._with_crc else {}
            args = dict(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=part,
                **crc,
            )
            self._inflight.append((number, self._submit("upload_part", **args), args))
            self._sent += len(part)
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
                back_off(exc, attempt, f"{self.path} part {number}")
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

    def _confirm_whole(self, parts: list[dict[str, Any]], response: Any) -> None:
        """The parts hold every byte written (no more, no less), and the object's
        composite CRC32 (the CRC32 of the parts' CRC32s, "-N"), where the store reports
        it, is the one they make."""
        if self._sent != self._size:
            raise StorageError(f"{self.path}: {self._sent} B sent in parts, {self._size} B written")
        crcs = [p.get("ChecksumCRC32") for p in parts]
        got = response.get("ChecksumCRC32") if isinstance(response, dict) else None
        if got is None or None in crcs:
            return  # the parts' own confirmations (or none) decide
        raw = b"".join(base64.b64decode(c) for c in crcs if c is not None)
        want = f"{crc32_b64(raw)}-{len(parts)}"
        if got != want and got != want.split("-")[0]:
            raise StorageError(
                f"{self.path}: the store reports CRC32 {got} for the object, {want} was sent"
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
                self._confirm(crc32_b64(body) if with_crc else None, response, "the object")
            else:
                if self._buf or (not self._parts and not self._inflight):
                    self._send_part(bytes(self._buf))
                while self._inflight:
                    self._finish_oldest()
                crash_point("s3.upload.before_complete")
                parts = sorted(self._parts, key=lambda p: p["PartNumber"])
                response = self._call(
                    "complete_multipart_upload",
                    Bucket=self._bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": parts},
                )
                self._forget_upload()
                self._confirm_whole(parts, response)
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
                with LIVE_LOCK:
                    ORPHANS.append((self._bucket, self._key, self._upload_id))
            self._forget_upload()

    def _forget_upload(self) -> None:
        with LIVE_LOCK:
            LIVE_UPLOADS.discard(self._upload_id or "")
        self._upload_id = None
