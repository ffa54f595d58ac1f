"""Configuration, one frozen dataclass per layer, each validated once when it is made.

- :class:`CheckpointerConfig`: how one :class:`~ckptstore.Checkpointer` saves (codec,
  threads, staging memory, the manifest key).
- :class:`ManagerConfig`: what a :class:`~ckptstore.CheckpointManager` does on top of
  it (when to save, what to keep, what "best" means), with its ``CheckpointerConfig``.
- :class:`BackupConfig`: the backup tier (where, what to keep there, the queue, retries).

Each is passed whole (``CheckpointManager(root, config=ManagerConfig(...),
backup=BackupConfig(...))``) or built from the keyword arguments the classes also take.

Secrets and environment fallbacks are resolved here, once, and never shown in a
``repr``: ``manifest_key=None`` takes ``$CKPTSTORE_MANIFEST_KEY`` when a config is made,
and what is below (the engine, the format) uses exactly the key it is given.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptstore.codecs import get_codec
from ckptstore.errors import InvalidArgumentError, InvalidArgumentTypeError
from ckptstore.format.shard import DEFAULT_CHUNK_BYTES
from ckptstore.format.shard_index import MAX_CHUNK_BYTES

MANIFEST_KEY_ENV = "CKPTSTORE_MANIFEST_KEY"


def resolve_manifest_key(key: bytes | None = None) -> bytes | None:
    """The key manifests are signed and checked with: ``key`` if given, else the UTF-8
    bytes of ``$CKPTSTORE_MANIFEST_KEY`` if set and non-empty, else None (unsigned)."""
    if key is not None:
        if not isinstance(key, (bytes, bytearray)) or not key:
            # never echo the key
            raise InvalidArgumentError("manifest_key must be non-empty bytes or None")
        return bytes(key)
    env = os.environ.get(MANIFEST_KEY_ENV)
    return env.encode() if env else None


def default_threads() -> int:
    """Every core this process may run on: the worker threads of a one-shot save or
    load (``ckptstore.save``/``load``: the caller waits for them, so they may take every
    core) when ``threads=None``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def background_threads() -> int:
    """A :class:`~ckptstore.Checkpointer`'s worker threads when ``threads=None``: the
    cores torch's intra-op threads leave free (``cores - torch.get_num_threads()``), at
    least 1, when torch is imported; else every core (:func:`default_threads`)."""
    cores = default_threads()
    torch = sys.modules.get("torch")
    if torch is None:
        return cores
    return max(1, cores - int(torch.get_num_threads()))


def io_window(threads: int) -> int:
    """Chunks a save keeps in flight at once: enough to keep ``threads`` workers busy
    while the writer drains finished ones, small enough to bound memory."""
    return 2 * threads + 2


@dataclass(frozen=True)
class CheckpointerConfig:
    """How a :class:`Checkpointer` saves. Every field has a default that suits most runs.

    codec: ``"auto"`` (uncompressed unless compressing finishes the write sooner; see
        :class:`~ckptstore.codecs.auto.AutoCodec`), ``"none"``, ``"zstd"``, or a config dict such as
        ``{"id": "zstd", "level": 3}``.
    max_inflight: saves in flight at once; each holds one staging buffer the size of
        the state. The next ``save_async`` waits for a slot (backpressure).
    threads: worker threads for encoding, hashing and reading: the CPU budget of a
        save or load (one writer thread more writes in order). Default (None): the
        cores torch's intra-op threads leave free, ``cores - torch.get_num_threads()``,
        at least 1 (every core if torch is not imported yet): a background save should
        not take the cores a CPU-bound training step runs on. On a 2-core machine with
        torch's default of 2 threads that is 1; on a GPU machine whose training runs
        fewer intra-op threads than cores, the rest. Raise it where the CPU is idle
        while saving (GPU training with ``torch.set_num_threads`` left at its default)
        and zstd saves or loads are too slow.
    worker_nice: how much lower the worker threads' CPU priority is than the thread
        that made the ``Checkpointer`` (Linux: per-thread niceness, 0-19; 0: the same;
        ignored elsewhere). Default 5: when training keeps every core busy it gets them
        first and a save's encoding and hashing take what is left (on 2 busy cores a
        512 MB zstd save took 3.0 s instead of 1.2 s and the loop kept 69% of its speed
        instead of 22%: the same CPU, spread); on an idle machine it changes nothing. The writer thread
        (the staging copy with ``overlap_copy``, the writes, and, in incremental saves,
        the hash jobs no worker has started when it needs their digests) keeps the
        caller's priority, since the training step may wait for it.
    chunk_bytes: size of independently encoded chunks.
    max_staging_bytes: cap on host memory for staging buffers (None: max_inflight x
        the state size).
    pin_memory: pin staging buffers (default: when the state has tensors on a GPU).
    sweep_grace_s: at start-up, leftovers of dead saves older than this are removed.
        Default: 60 s on local disk, where a lock protects a save in progress whatever
        its age; 1 hour on object stores, where nothing but age can (make it longer
        than your slowest save).
    manifest_key: a secret (bytes) to sign every manifest with (HMAC-SHA256) and to
        require on every load, verify and listing: a checkpoint whose manifest is not
        signed with it is refused before any other file is read, so someone who can
        write to the checkpoint root but lacks the key cannot make a load read files
        of their choosing. None (default): ``$CKPTSTORE_MANIFEST_KEY`` (UTF-8) if set,
        else unsigned. Never shown in ``repr``; keep it out of logs and manifests.
    backend_options: options for the root's storage backend, e.g. for S3
        ``{"part_bytes": 64 << 20, "parts_in_flight": 8, "read_timeout_s": 60}`` (see
        :class:`~ckptstore.storage.S3Backend`); unknown names are refused when it opens.
    incremental: tensors byte-identical to this checkpointer's last committed save are
        not written again: the files holding them are hard-linked into the new
        checkpoint on local disk, copied inside the store on an object store (no bytes
        from this machine), and written in full where neither can be made. Off by
        default while it is proven (:mod:`ckptstore.dcp.incremental`).
    full_every: with ``incremental``, every this many saves one writes everything
        (bounds the bytes a chain of links keeps; 0: never; 1: every save, as without
        ``incremental``: nothing is hashed).
    trust_version_counters: with ``incremental``, a large CPU tensor whose bytes were
        found unchanged (by hash, its version counter unmoved) is from then on, while it
        keeps that storage, hashed after ``save`` returns, not before: the training loop
        does not wait for it. A save whose tensor then hashes differently (written
        through ``.data`` or a raw pointer before the save, or written at all after
        ``save`` returned and before its hash) fails with ``StateChangedError`` instead
        of committing stale bytes, and that tensor is hashed before returning from then
        on. Off by default: leave it off if anything writes a frozen tensor through
        ``.data`` (PEFT's merge and unmerge do) or right after a save.
    """

    codec: str | dict[str, Any] = "auto"
    max_inflight: int = 1
    threads: int | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_staging_bytes: int | None = None
    pin_memory: bool | None = None
    sweep_grace_s: float | None = None
    manifest_key: bytes | None = field(default=None, repr=False)
    backend_options: Mapping[str, Any] | None = None
    worker_nice: int = 5
    incremental: bool = False
    full_every: int = 10
    trust_version_counters: bool = False

    def __post_init__(self) -> None:
        if self.backend_options is not None and not isinstance(self.backend_options, Mapping):
            raise InvalidArgumentError(
                f"backend_options must be a dict or None, got {type(self.backend_options).__name__}"
            )
        if self.codec != "auto":
            get_codec(self.codec)  # raises InvalidArgumentError naming the known codecs
        if not isinstance(self.max_inflight, int) or self.max_inflight < 1:
            raise InvalidArgumentError(
                f"max_inflight must be an int >= 1, got {self.max_inflight!r}"
            )
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise InvalidArgumentError(f"threads must be an int >= 1 or None, got {self.threads!r}")
        if (
            isinstance(self.worker_nice, bool)
            or not isinstance(self.worker_nice, int)
            or not 0 <= self.worker_nice <= 19
        ):
            raise InvalidArgumentError(
                f"worker_nice must be an int from 0 to 19, got {self.worker_nice!r}"
            )
        if (
            not isinstance(self.chunk_bytes, int)
            or not 4096 <= self.chunk_bytes <= MAX_CHUNK_BYTES
            or self.chunk_bytes % 4096
        ):
            raise InvalidArgumentError(
                f"chunk_bytes must be a multiple of 4096 up to {MAX_CHUNK_BYTES}, got {self.chunk_bytes!r}"
            )
        if self.max_staging_bytes is not None and self.max_staging_bytes <= 0:
            raise InvalidArgumentError(
                f"max_staging_bytes must be positive or None, got {self.max_staging_bytes!r}"
            )
        if not isinstance(self.incremental, bool):
            raise InvalidArgumentTypeError(
                f"incremental must be True or False, got {self.incremental!r}"
            )
        if not isinstance(self.trust_version_counters, bool):
            raise InvalidArgumentTypeError(
                f"trust_version_counters must be True or False, got {self.trust_version_counters!r}"
            )
        if self.trust_version_counters and not self.incremental:
            raise InvalidArgumentError(
                "trust_version_counters=True is about incremental saves: pass incremental=True too"
            )
        if (
            isinstance(self.full_every, bool)
            or not isinstance(self.full_every, int)
            or self.full_every < 0
        ):
            raise InvalidArgumentError(f"full_every must be an int >= 0, got {self.full_every!r}")
        if self.sweep_grace_s is not None and self.sweep_grace_s < 0:
            raise InvalidArgumentError(f"sweep_grace_s must be >= 0, got {self.sweep_grace_s!r}")
        object.__setattr__(self, "manifest_key", resolve_manifest_key(self.manifest_key))

    @property
    def resolved_threads(self) -> int:
        """``threads``, or :func:`background_threads` when None."""
        return self.threads or background_threads()


def check_policy(policy: object, kind: str) -> None:
    """Refuse a policy of the wrong kind now, not at the first save or prune.

    ``kind`` is ``"save"`` (members need ``should_save``) or ``"keep"`` (``keep``);
    ``AnyOf`` (anything with a ``policies`` tuple) is checked member by member.
    """
    if policy is None:
        return
    inner = getattr(policy, "policies", None)
    members = inner if isinstance(inner, tuple) else (policy,)
    for p in members:
        if isinstance(getattr(p, "policies", None), tuple):
            check_policy(p, kind)
            continue
        method = "should_save" if kind == "save" else "keep"
        if not callable(getattr(p, method, None)):
            wanted = "SavePolicy" if kind == "save" else "RetentionPolicy"
            example = "SaveEvery(steps=500)" if kind == "save" else "KeepLast(3)"
            raise InvalidArgumentTypeError(f"{kind}= needs {wanted}s such as {example}; got {p!r}")


@dataclass(frozen=True)
class ManagerConfig:
    """What a :class:`~ckptstore.CheckpointManager` does.

    save: a save policy (``SaveEvery(steps=500)``, ``AnyOf(...)``); None: only on
        completion, signal and error.
    keep: a retention policy (``KeepLast(3)``, ...); None: keep everything.
    enabled: False turns every write off (``restore`` still reads).
    best_metric / best_mode: what "best" means (default: the metric and mode of a
        ``KeepBest`` in ``keep``).
    checkpointer: how each checkpoint is written (:class:`CheckpointerConfig`).
    overlap_copy: a TrainState's tensors are copied on the writer thread while the loop
        goes on (``optimizer.step()`` waits for the copy; see
        ``ckptstore.integrations.overlap``). False: every save copies before returning.
        Plain dicts are always copied before returning.
    """

    save: Any = None
    keep: Any = None
    enabled: bool = True
    best_metric: str | None = None
    best_mode: str = "min"
    checkpointer: CheckpointerConfig = field(default_factory=CheckpointerConfig)
    overlap_copy: bool = True

    def __post_init__(self) -> None:
        check_policy(self.save, "save")
        check_policy(self.keep, "keep")
        if self.best_mode not in ("min", "max"):
            raise InvalidArgumentError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if not isinstance(self.checkpointer, CheckpointerConfig):
            raise InvalidArgumentTypeError(
                f"checkpointer must be a CheckpointerConfig, got {type(self.checkpointer).__name__}"
            )


@dataclass(frozen=True)
class BackupConfig:
    """The backup tier of a :class:`~ckptstore.CheckpointManager`.

    url: where checkpoints are copied (``s3://bucket/prefix``, any fsspec URL, a path).
    keep: retention on the remote (None: the manager's ``keep``).
    storage_options: for the remote's file system (endpoint, credentials); never shown.
    backend_options: for the remote's backend (for S3: part size, parts in flight,
        timeouts; see :class:`~ckptstore.storage.S3Backend`).
    max_queued: committed checkpoints waiting at most behind the one uploading; older
        waiting ones are skipped for newer ones.
    retry_max_s: the longest wait between retries of a failed upload.
    """

    url: Any
    keep: Any = None
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    backend_options: Mapping[str, Any] | None = None
    max_queued: int = 1
    retry_max_s: float = 60.0

    def __post_init__(self) -> None:
        if self.url is None or self.url == "":
            raise InvalidArgumentError("BackupConfig needs url=, e.g. 's3://my-bucket/runs/exp1'")
        check_policy(self.keep, "keep")
        if isinstance(self.max_queued, bool) or not isinstance(self.max_queued, int):
            raise InvalidArgumentError(f"max_queued must be an int >= 1, got {self.max_queued!r}")
        if self.max_queued < 1:
            raise InvalidArgumentError(f"max_queued must be at least 1, got {self.max_queued}")
        if not (isinstance(self.retry_max_s, (int, float)) and math.isfinite(self.retry_max_s)):
            raise InvalidArgumentError(
                f"retry_max_s must be a finite number, got {self.retry_max_s!r}"
            )


def manager_configs(
    config: ManagerConfig | None,
    backup: Any,
    *,
    save: Any,
    keep: Any,
    enabled: bool,
    best_metric: str | None,
    best_mode: str,
    backup_keep: Any,
    backup_options: Mapping[str, Any] | None,
    backup_max_queued: int,
    backup_retry_max_s: float,
    checkpointer_options: Mapping[str, Any],
    manager_params: Iterable[str] = (),
) -> tuple[ManagerConfig, BackupConfig | None]:
    """The configs of a ``CheckpointManager`` from its arguments: ``config=`` (and
    ``backup=BackupConfig(...)``) as given, or built from the keywords; both at once is
    an error."""
    if config is None:
        config = ManagerConfig(
            save=save,
            keep=keep,
            enabled=enabled,
            best_metric=best_metric,
            best_mode=best_mode,
            checkpointer=checkpointer_config(
                checkpointer_options, "CheckpointManager", manager_params
            ),
        )
    elif (
        save is not None
        or keep is not None
        or not enabled
        or best_metric is not None
        or best_mode != "min"
        or checkpointer_options
    ):
        raise InvalidArgumentTypeError(
            "pass either config=ManagerConfig(...) or its fields as keywords, not both"
        )
    if backup is not None and not isinstance(backup, BackupConfig):
        backup = BackupConfig(
            url=backup,
            keep=backup_keep,
            storage_options=backup_options,
            max_queued=backup_max_queued,
            retry_max_s=backup_retry_max_s,
        )
    elif backup_keep is not None or backup_options is not None:
        raise InvalidArgumentTypeError(
            "with backup=BackupConfig(...), put keep= and options inside it"
        )
    return config, backup


def checkpointer_config(
    options: Mapping[str, Any], caller: str, also: Iterable[str] = ()
) -> CheckpointerConfig:
    """``CheckpointerConfig(**options)``, with a keyword it does not take said in the
    caller's name, with the nearest one it does (a typo said
    "CheckpointerConfig.__init__() got an unexpected keyword argument 'kep'")."""
    known = {f.name for f in dataclasses.fields(CheckpointerConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        near = difflib.get_close_matches(unknown[0], sorted(known | set(also)), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise InvalidArgumentTypeError(
            f"{caller}() got an unexpected keyword argument {unknown[0]!r}{hint}"
        )
    return CheckpointerConfig(**options)
