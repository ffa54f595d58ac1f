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
  and s3fs retry a few times; every call ckptstore makes itself (parts, PUTs,
  multipart starts and completions, listings of uploads, deletes) then goes on asking,
  after pauses that double from about 1 s with jitter, up to ``THROTTLE_RETRIES`` (4)
  more times. Since each attempt is retried by botocore and s3fs again, these stay
  few. Calls s3fs makes on its own (``exists``, ``ls``) have only its retries.
* **Checksums the store checks.** Every part and every small PUT carries its CRC32
  (``x-amz-checksum-crc32``, computed here; botocore would otherwise compute the same
  one itself), which S3 checks against the bytes it received, refusing a part that
  differs; the sink then compares the checksum the store reports for each part with
  its own (:attr:`~ckptstore.storage.s3_upload.MultipartSink.confirmed`). A copy to a store that is seen to refuse
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
import contextlib
import itertools
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any

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
    MIN_PART_BYTES,
    check_upload_options,
    client_config,
    merge_client_config,
    with_client_config,
)
from ckptstore.storage.s3_reader import S3Reader
from ckptstore.storage.s3_upload import (
    CHECKSUM_REFUSED,
    LIVE_LOCK,
    LIVE_UPLOADS,
    ORPHANS,
    MultipartSink,
    back_off,
    checksum_args,
    error_code,
)

__all__ = ["MIN_PART_BYTES", "S3Backend", "S3Reader", "is_s3", "open_s3_backend"]

log = logging.getLogger("ckptstore")


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


# How a store that lacks an optional argument (a checksum, If-None-Match) refuses it:
# asked again without, and never again.
ARGUMENT_REFUSED = ("NotImplemented", "InvalidArgument", "InvalidRequest")


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
        how long one attempt of an S3 call ckptstore makes itself may take, botocore's
        and s3fs's retries included; throttled calls are attempted up to
        ``THROTTLE_RETRIES`` more times (``s3_upload.back_off``).
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
        self._copy_checksums = True  # ask for a CRC32 of each copy (copy_inside)
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
                back_off(exc, attempt, f"{self.url}: {method}")
        raise AssertionError("unreachable")

    def create_sink(self, path: str, size_hint: int | None = None) -> FileSink:
        return MultipartSink(self, path, size_hint)

    def object_exists(self, path: str) -> bool:
        # One HEAD: s3fs's ``exists`` follows a missing key with a LIST (a "directory"?).
        bucket, key, _ = self.fs.split_path(path)
        try:
            self._call("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return False
        return True

    def version_tag(self, name: str) -> str | None:
        bucket, key, _ = self.fs.split_path(self.store_path(name))
        try:
            head = self._call("head_object", Bucket=bucket, Key=key)
        except Exception:  # missing, or unreachable: nothing to go by
            return None
        tag = head.get("ETag")
        return f"{tag} {head.get('ContentLength')}" if tag else None

    def call_with_checksum(
        self, method: str, data: bytes | None, **kwargs: Any
    ) -> tuple[Any, bool]:
        """``method`` with checksum arguments (the algorithm, to start a multipart
        upload; with ``data``, also its CRC32), and whether they were sent: a server
        that refuses them is asked again without, and never again (a warning, once).
        botocore may still add a checksum of its own (its default
        ``request_checksum_calculation="when_supported"``); a server that refuses that
        too needs ``storage_options={"config_kwargs": {"request_checksum_calculation":
        "when_required"}}``, as it would without ckptstore."""
        if self._checksums:
            try:
                return self._call(method, **kwargs, **checksum_args(data)), True
            except Exception as exc:
                if error_code(exc) not in ARGUMENT_REFUSED:
                    raise
                log.warning(
                    "%s refused S3 checksum arguments (x-amz-checksum-crc32: %s); asking "
                    "again without ckptstore's (botocore may still add its own: "
                    "config_kwargs request_checksum_calculation='when_required' turns "
                    "them off); copies are read back",
                    self.url,
                    error_code(exc),
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
        args = checksum_args(b"not this")
        try:
            self._call("put_object", Bucket=self.bucket, Key=key, Body=b"probe", **args)
        except Exception as exc:
            if error_code(exc) in CHECKSUM_REFUSED:
                return True
            log.info("%s: checksum probe failed (%s); copies are read back", self.url, exc)
            return False
        with contextlib.suppress(Exception):
            self._call("delete_object", Bucket=self.bucket, Key=key)
        return False

    def copy_inside(self, src: str, dst: str, recursive: bool = False) -> None:
        # File by file (a directory's: each object under it), each a copy of its own:
        # a refusal below then retries that file alone, with nothing half copied.
        if not recursive:
            self._copy_object(src, dst)
            return
        top = self.fs._strip_protocol(src).rstrip("/")
        for path in self.fs.find(src):
            rest = self.fs._strip_protocol(path)[len(top) :]
            if rest.startswith("/"):
                self._copy_object(path, f"{dst.rstrip('/')}{rest}")

    def _copy_object(self, src: str, dst: str) -> None:
        # With a checksum algorithm the copy gets a CRC32 of its own bytes. Without, a
        # copy of a multipart upload's object kept the source's composite checksum
        # (moto 5.2), which every GET of the copy then failed to match (botocore's
        # FlexibleChecksumError): incremental links and moved-aside checkpoints. Only
        # where s3fs makes one CopyObject of it: above MANAGED_COPY_THRESHOLD it copies
        # in parts and completes them without the parts' checksums, which AWS refuses
        # for an upload created with an algorithm.
        import s3fs.core

        if (
            self._checksums
            and self._copy_checksums
            and self.fs.size(src) <= s3fs.core.MANAGED_COPY_THRESHOLD
        ):
            try:
                self.fs.copy(src, dst, ChecksumAlgorithm="CRC32")
                return
            except Exception as exc:  # CopyObject is all or nothing: nothing to undo
                if error_code(exc) not in ARGUMENT_REFUSED:
                    raise
                log.warning("%s refused a checksum algorithm on a copy (%s); copying without", self.url, error_code(exc))  # fmt: skip
                self._copy_checksums = False
        self.fs.copy(src, dst)

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
                if error_code(exc) not in ARGUMENT_REFUSED:
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
            code = error_code(exc)
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
        with LIVE_LOCK:
            todo = [o for o in ORPHANS if o[0] == self.bucket]
        for bucket, key, upload_id in todo:
            try:
                self._call("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
            except FileNotFoundError:
                pass  # NoSuchUpload: already gone
            except Exception:
                continue
            with LIVE_LOCK:
                ORPHANS.remove((bucket, key, upload_id))
        with LIVE_LOCK:
            return sum(1 for o in ORPHANS if o[0] == self.bucket)

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
            with LIVE_LOCK:
                live = upload["UploadId"] in LIVE_UPLOADS
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
