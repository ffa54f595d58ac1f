"""S3Backend's settings: defaults, validation, and botocore's client configuration.

The multipart settings (``part_bytes``, ``parts_in_flight``, ``call_timeout_s``) are
ckptstore's own; the connect/read timeouts and request retries are botocore's, given to
s3fs as ``config_kwargs`` (:func:`client_config`). All are keyword arguments of
:class:`~ckptstore.storage.s3.S3Backend` and names ``open_backend(...,
backend_options=...)`` accepts for ``s3://`` roots (:data:`BACKEND_OPTIONS`).
"""

from __future__ import annotations

from typing import Any

MIB = 1 << 20
MIN_PART_BYTES = 5 * MIB  # S3's minimum for every part but the last
MAX_PARTS = 10_000  # S3's maximum parts per upload

DEFAULT_PART_BYTES = 16 * MIB
DEFAULT_PARTS_IN_FLIGHT = 4
DEFAULT_MAX_PART_BYTES = 128 * MIB
DEFAULT_CALL_TIMEOUT_S = 600.0
# What open_backend(..., backend_options=...) accepts for an s3:// URL.
BACKEND_OPTIONS = frozenset(
    {
        "part_bytes",
        "max_part_bytes",
        "parts_in_flight",
        "call_timeout_s",
        "connect_timeout_s",
        "read_timeout_s",
        "request_retries",
    }
)


def _check_int(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an int, got {value!r}")


def _check_seconds(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{what} must be a number of seconds > 0, got {value!r}")


def client_config(
    *,
    connect_timeout_s: float | None = None,
    read_timeout_s: float | None = None,
    request_retries: int | None = None,
) -> dict[str, Any]:
    """botocore ``Config`` arguments (s3fs's ``config_kwargs``) for the settings that
    are not None; validated. Empty when all are None."""
    config: dict[str, Any] = {}
    if connect_timeout_s is not None:
        _check_seconds("connect_timeout_s", connect_timeout_s)
        config["connect_timeout"] = connect_timeout_s
    if read_timeout_s is not None:
        _check_seconds("read_timeout_s", read_timeout_s)
        config["read_timeout"] = read_timeout_s
    if request_retries is not None:
        _check_int("request_retries", request_retries)
        if request_retries < 0:
            raise ValueError(f"request_retries must be >= 0, got {request_retries}")
        config["retries"] = {"max_attempts": request_retries}
    return config


def merge_client_config(config_kwargs: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """``config_kwargs`` (as given to s3fs) with ``config`` (from :func:`client_config`)
    laid over it; a ``retries`` dict is merged key by key (its ``mode`` is kept)."""
    merged = {**config_kwargs, **config}
    if "retries" in config and isinstance(config_kwargs.get("retries"), dict):
        merged["retries"] = {**config_kwargs["retries"], **config["retries"]}
    return merged


def with_client_config(fs: Any, config: dict[str, Any]) -> Any:
    """The s3fs file system ``fs`` if it already has ``config`` (from
    :func:`client_config`), else a private copy of it that does: fsspec shares cached
    instances, and changing one would change every backend that uses it."""
    if not config:
        return fs
    current = getattr(fs, "config_kwargs", None)
    if not isinstance(current, dict):
        raise ValueError(
            f"connect/read timeouts and request retries need an s3fs file system, got {type(fs).__name__}"
        )
    merged = merge_client_config(current, config)
    if merged == current:
        return fs
    options = {**fs.storage_options, "config_kwargs": merged, "skip_instance_cache": True}
    copy = type(fs)(*fs.storage_args, **options)
    copy.retries = fs.retries  # s3fs's own retries, in case they were set on the instance
    return copy


def check_upload_options(part_bytes: Any, parts_in_flight: Any, call_timeout_s: Any) -> None:
    """Raise :class:`ValueError` for a multipart setting S3 or ckptstore cannot use."""
    _check_int("part_bytes", part_bytes)
    if part_bytes < MIN_PART_BYTES:
        raise ValueError(f"part_bytes must be at least {MIN_PART_BYTES} (S3's minimum)")
    _check_int("parts_in_flight", parts_in_flight)
    if parts_in_flight < 1:
        raise ValueError("parts_in_flight must be at least 1")
    _check_seconds("call_timeout_s", call_timeout_s)
