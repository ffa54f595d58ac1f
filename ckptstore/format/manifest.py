"""``manifest.json``: the self-describing record of one committed checkpoint.

Written last; its presence is what makes a checkpoint exist. It lists every file with
its size and checksum, so a reader can check everything before it trusts anything
(DCP's ``.metadata`` is a pickle: it is only unpickled, with a restricted unpickler,
after its checksum here matches). The manifest checksums itself too, so a flipped bit
in it is caught rather than believed.

Example (abridged)::

    {
      "format": "ckptstore", "format_version": 1,
      "step": 500, "created_unix_s": 1763790000.25, "world_size": 2,
      "codec": {"id": "zstd", "level": 1, "byte_group": true},
      "files": {
        ".metadata":     {"kind": "file",  "size_bytes": 48213,     "xxh3_64": "9f1c..."},
        "__0_0.distcp":  {"kind": "shard", "size_bytes": 912340211, "xxh3_64": "03ab..."}
      },
      "raw_bytes": 1103527424, "stored_bytes": 912388424,
      "metadata": {"epoch": 3},
      "versions": {"ckptstore": "0.1.0", "torch": "2.13.0"},
      "run_id": "4f0c2a9e1b7d4c83",
      "checksum": "xxh3-64:5e0d..."
    }

**Run identity.** ``run_id`` (optional; absent in checkpoints written without a
:class:`~ckptstore.CheckpointManager`, and in older ones) names the training run that
wrote the checkpoint: a resumed run keeps it, a run started afresh gets a new one. A run
that restored an earlier checkpoint and set the newer ones aside
(``restore(newer="discard")``, ``ckptstore train --discard-newer``) is a new *branch*: a
new ``run_id``, with ``"lineage"`` listing the runs it branched from, nearest first
(absent when empty). Retention and the backup tier consider only the checkpoints of the
current run and its lineage. Two checkpoints are the same checkpoint when they list the same files with the same sizes
and checksums and belong to the same run (:meth:`Manifest.same_checkpoint`): a name is
not enough, since another run (or a branch retired by ``restore(newer="discard")``) may
have written a checkpoint of the same step.

**Signed manifests.** With a manifest key configured (``Checkpointer(...,
manifest_key=b"...")`` or the environment variable ``CKPTSTORE_MANIFEST_KEY``), the
manifest also carries ``"hmac": "hmac-sha256:<hex>"``, an HMAC-SHA256 under that key of
the canonical body (everything but ``checksum`` and ``hmac``). A reader with a key
refuses, before it reads any other file of the checkpoint, a manifest whose HMAC is
missing or does not match (:class:`~ckptstore.errors.UnsafeCheckpointError`): an
attacker who can write the checkpoint but does not know the key cannot rewrite the
manifest and its checksums to match altered files. A reader without a key ignores the
field, so signed checkpoints load anywhere. The files themselves are bound to the
manifest by size and xxh3-64, which detects corruption but is not a cryptographic hash.

**Node-local parts.** When the ranks of a job write to different disks (each node its
own ``--ckpt-dir``), each disk holds a *part* of the checkpoint: its own ranks' shard
files and a ``.metadata`` that points at them, committed under the same name. Its
manifest has ``"part": {"disk": ..., "coordinator": ..., "elsewhere": {...}}``: the disk
it lies on, the disk of the rank that commits the checkpoint (rank 0; its part is
committed last), and the shard files that lie on the other disks, with their sizes and
checksums, and (since 2026-12-07) ``"elsewhere_raw_bytes"``, their raw bytes: the
manifest's ``raw_bytes`` counts its own files'. A checkpoint is complete when every
disk's part is committed.

**Linked files (incremental saves).** A save that finds some of its tensors
byte-identical to its last save's does not write them again: it hard-links the shard
files that hold them into the new checkpoint, and DCP's ``.metadata`` points those
tensors there. The manifest lists such a file like any other and names, under
``"linked"``, the checkpoint that first wrote it: ``"linked": {"__0_0-step_00000100.distcp":
"step_00000100"}``. Every checkpoint is still a directory that holds every byte it
needs: deleting one never touches another's data (the file system counts the links).

For ``kind: "file"`` the checksum is of the whole file. A ``"shard"`` is covered by a
hash tree: the manifest holds the checksum of the shard's index, and the index holds the
checksum of every chunk (``ckptstore.format.shard``). Nothing is hashed twice on save.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ckptstore.errors import (
    HINT_DAMAGED_MANIFEST,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    UnsafeCheckpointError,
)
from ckptstore.format.checksum import ALGORITHM, digest, is_digest
from ckptstore.layout import MANIFEST_FILE, check_name

FORMAT_NAME = "ckptstore"
FORMAT_VERSION = 1
FILE_KINDS = ("file", "shard")
HMAC_ALGORITHM = "hmac-sha256"
_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _sign(key: bytes, body: dict[str, Any]) -> str:
    return f"{HMAC_ALGORITHM}:{hmac.new(key, _canonical(body), hashlib.sha256).hexdigest()}"


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint: its kind, exact size and checksum (see module doc)."""

    kind: str
    size_bytes: int
    xxh3_64: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "size_bytes": self.size_bytes, "xxh3_64": self.xxh3_64}


@dataclass(frozen=True)
class Part:
    """One disk's part of a checkpoint written to node-local disks (see module doc)."""

    disk: str  # the disk this part lies on (``StorageBackend.disk_id``)
    coordinator: str  # the disk of rank 0, whose part is committed last
    elsewhere: dict[str, FileEntry]  # shard files on the other disks
    # Their raw bytes (the whole checkpoint's raw_bytes is the manifest's plus these);
    # None in parts written before 2026-12-07
    elsewhere_raw_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "disk": self.disk,
            "coordinator": self.coordinator,
            "elsewhere": {n: e.to_json() for n, e in sorted(self.elsewhere.items())},
            **(
                {"elsewhere_raw_bytes": self.elsewhere_raw_bytes}
                if self.elsewhere_raw_bytes is not None
                else {}
            ),
        }


# In the message of a manifest refused for its signature alone (its checksum matched):
# the CLI tells such checkpoints apart from damaged ones by it.
UNSIGNED = "under the configured manifest key"


@dataclass(frozen=True)
class Manifest:
    step: int | None  # None for a checkpoint saved by path without a step
    world_size: int
    codec: dict[str, Any]
    files: dict[str, FileEntry]
    raw_bytes: int
    stored_bytes: int
    created_unix_s: float
    metadata: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # Written by the CheckpointManager (optional for a plain save):
    epoch: int | None = None
    reason: str | None = None  # "interval", "epoch", "final", "signal", "error", "manual"
    metrics: dict[str, float | None] = field(default_factory=dict)  # None: not finite
    run_id: str | None = None  # the run that wrote it (see module doc); None: not recorded
    lineage: tuple[str, ...] = ()  # the runs it branched from, nearest first (module doc)
    part: Part | None = None  # a node-local disk's part of the checkpoint (module doc)
    # Incremental saves: shard files this checkpoint shares with earlier ones (hard
    # links), by name, and the checkpoint that first wrote each (module doc)
    linked: dict[str, str] = field(default_factory=dict)

    @property
    def owned_bytes(self) -> int:
        """Stored bytes of the files this checkpoint wrote itself (not ``linked``)."""
        return sum(e.size_bytes for n, e in self.files.items() if n not in self.linked)

    @property
    def ratio(self) -> float:
        """Stored / raw bytes (1.0 for an empty state)."""
        return self.stored_bytes / self.raw_bytes if self.raw_bytes else 1.0

    def same_checkpoint(self, other: Manifest) -> bool:
        """Whether ``other`` describes the same checkpoint: the same step, run and files
        (names, sizes, checksums). A copy made by :mod:`ckptstore.transfer` is."""
        return (
            self.step == other.step
            and self.run_id == other.run_id
            and self.all_files() == other.all_files()
        )

    def all_files(self) -> dict[str, FileEntry]:
        """Every file of the checkpoint: with a node-local part's, those on other disks."""
        return self.files if self.part is None else {**self.files, **self.part.elsewhere}

    def body(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "step": self.step,
            "created_unix_s": self.created_unix_s,
            "world_size": self.world_size,
            "codec": self.codec,
            "files": {name: e.to_json() for name, e in sorted(self.files.items())},
            "raw_bytes": self.raw_bytes,
            "stored_bytes": self.stored_bytes,
            "metadata": self.metadata,
            "versions": self.versions,
            "epoch": self.epoch,
            "reason": self.reason,
            "metrics": self.metrics,
            # Only when recorded: a manifest without one keeps its bytes, and its checksum.
            **({"run_id": self.run_id} if self.run_id is not None else {}),
            **({"lineage": list(self.lineage)} if self.lineage else {}),
            **({"part": self.part.to_json()} if self.part is not None else {}),
            **({"linked": dict(sorted(self.linked.items()))} if self.linked else {}),
        }

    def to_json(self, key: bytes | None = None) -> bytes:
        """The manifest's bytes; signed with ``key`` (HMAC-SHA256, see module doc) when given."""
        body = self.body()
        secret = key
        if secret is not None:
            body["hmac"] = _sign(secret, body)
        body["checksum"] = f"{ALGORITHM}:{digest(_canonical(body))}"
        return json.dumps(body, indent=1, sort_keys=True, allow_nan=False).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: str, *, key: bytes | None = None) -> Manifest:
        """Parse and check a manifest read from ``where`` (a checkpoint, for messages).

        With a ``key``, a manifest whose HMAC is
        missing or wrong raises :class:`UnsafeCheckpointError` before any field is used.
        """
        hint = HINT_DAMAGED_MANIFEST
        try:
            body = json.loads(data, parse_constant=_not_json)
        except (ValueError, RecursionError) as exc:  # bad UTF-8/JSON, 5000-digit ints, deep nesting
            raise CorruptCheckpointError(
                f"{where}/{MANIFEST_FILE} is not valid JSON ({exc}); {hint}"
            ) from None
        if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
            raise IncompatibleCheckpointError(
                f'{where}/{MANIFEST_FILE} is not a ckptstore manifest (no "format": "{FORMAT_NAME}")'
            )
        version = body.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise CorruptCheckpointError(
                f"{where}/{MANIFEST_FILE}: bad format_version {version!r}; {hint}"
            )
        if version > FORMAT_VERSION:
            raise IncompatibleCheckpointError(
                f"{where} was written in format {version} by a newer ckptstore; this one reads "
                f"up to format {FORMAT_VERSION}: upgrade ckptstore to load it"
            )
        stated = body.pop("checksum", None)
        expected = f"{ALGORITHM}:{digest(_canonical(body))}"
        if stated != expected:
            raise CorruptCheckpointError(
                f"{where}/{MANIFEST_FILE} checksum mismatch (stated {stated!r}, content hashes "
                f"to {expected!r}); {hint}"
            )
        stated_mac = body.pop("hmac", None)
        secret = key
        if secret is not None and not (
            isinstance(stated_mac, str)
            and hmac.compare_digest(
                stated_mac.encode("utf-8", "surrogatepass"), _sign(secret, body).encode()
            )
        ):
            found = "has no HMAC" if stated_mac is None else "has an HMAC that does not match"
            raise UnsafeCheckpointError(
                f"{where}/{MANIFEST_FILE} {found} {UNSIGNED}: it was "
                "not written by a holder of that key, or was altered. Refusing to read this "
                "checkpoint; restore one signed with the key, or unset the key to trust it"
            )
        try:
            return cls._from_body(body)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(
                f"{where}/{MANIFEST_FILE} is malformed ({exc}); {hint}"
            ) from None

    @classmethod
    def _from_body(cls, body: dict[str, Any]) -> Manifest:
        files = _file_entries(body["files"], "files")
        part = body.get("part")
        if part is not None:
            if not isinstance(part, dict):
                raise TypeError("part must be an object")
            disks = (part["disk"], part["coordinator"])
            if not all(isinstance(d, str) and d for d in disks):
                raise TypeError("part.disk and part.coordinator must be strings")
            other_raw = part.get("elsewhere_raw_bytes")
            part = Part(
                *disks,
                _file_entries(part["elsewhere"], "part.elsewhere"),
                None if other_raw is None else _nonneg_int(other_raw, "part.elsewhere_raw_bytes"),
            )
        created = body["created_unix_s"]
        if not isinstance(created, (int, float)) or not math.isfinite(created):
            raise TypeError("created_unix_s must be a number")
        for key in ("codec", "metadata", "versions", "metrics"):
            if not isinstance(body.get(key, {}), dict):
                raise TypeError(f"{key} must be an object")
        epoch = body.get("epoch")
        reason = body.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise TypeError("reason must be a string")
        metrics = body.get("metrics", {})
        run_id = body.get("run_id")
        if run_id is not None:
            check_run_id(run_id)
        lineage = body.get("lineage", [])
        if not isinstance(lineage, list):
            raise TypeError("lineage must be a list of run ids")
        for ancestor in lineage:
            check_run_id(ancestor)
        for k, v in metrics.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise TypeError(f"metric {k!r} must be a number or null")
        linked = body.get("linked", {})
        if not isinstance(linked, dict):
            raise TypeError("linked must be an object")
        for name, origin in linked.items():
            if name not in files or files[name].kind != "shard":
                raise ValueError(f"linked file {name!r} is not a shard the manifest lists")
            check_name(origin, what="checkpoint name")
        return cls(
            step=None if body["step"] is None else _nonneg_int(body["step"], "step"),
            world_size=_nonneg_int(body["world_size"], "world_size"),
            codec=body["codec"],
            files=files,
            raw_bytes=_nonneg_int(body["raw_bytes"], "raw_bytes"),
            stored_bytes=_nonneg_int(body["stored_bytes"], "stored_bytes"),
            created_unix_s=float(created),
            metadata=body.get("metadata", {}),
            versions=body.get("versions", {}),
            format_version=body["format_version"],
            epoch=None if epoch is None else _nonneg_int(epoch, "epoch"),
            reason=reason,
            metrics=metrics,
            run_id=run_id,
            lineage=tuple(lineage),
            part=part,
            linked=dict(linked),
        )


def _file_entries(raw_files: Any, what: str) -> dict[str, FileEntry]:
    files: dict[str, FileEntry] = {}
    if not isinstance(raw_files, dict):
        raise TypeError(f"{what} must be an object")
    for name, e in raw_files.items():
        check_name(name, what="file name")
        if "/" in name:
            raise ValueError(f"file name {name!r} has a directory part")
        if not isinstance(e, dict) or e.get("kind") not in FILE_KINDS:
            raise ValueError(f"file {name!r}: bad entry {e!r}")
        size = _nonneg_int(e["size_bytes"], f"{what}.{name}.size_bytes")
        if not is_digest(e["xxh3_64"]):
            raise ValueError(f"file {name!r}: bad checksum {e['xxh3_64']!r}")
        files[name] = FileEntry(e["kind"], size, e["xxh3_64"])
    return files


def new_run_id() -> str:
    """A fresh run id: 16 random hex digits."""
    return uuid.uuid4().hex[:16]


def check_run_id(run_id: Any) -> str:
    """A run id is 1 to 64 letters, digits, ``-`` or ``_``; anything else is a ValueError."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"run_id must be 1-64 letters, digits, '-' or '_', got {run_id!r}")
    return run_id


def _not_json(constant: str) -> Any:
    # Python's json reads NaN and Infinity, which no manifest holds (it is written with
    # allow_nan=False) and which its checksum could not even be computed over.
    raise ValueError(f"{constant} is not JSON")


def _nonneg_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
