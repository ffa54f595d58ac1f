"""What one save is asked to write (:class:`SaveSpec`) and what a node-local part of it
came to (:class:`PartFiles`): plain values that the engine hands the writer
(:mod:`ckptstore.dcp.writer`) and gets back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptstore.codecs import Codec
from ckptstore.format.shard import DEFAULT_CHUNK_BYTES


@dataclass(frozen=True)
class SaveSpec:
    """How one save is written and what its manifest records besides the files.

    Made once per save by the Checkpointer (or a one-shot ``ckptstore.save``) and handed
    down whole: ``codec``, ``chunk_bytes`` and ``window`` (chunks in flight) say how
    shards are encoded; ``step``, ``metadata`` (the user's JSON), ``epoch``, ``reason``,
    ``metrics``, ``run_id`` and ``lineage`` go into the manifest, which is signed with
    ``manifest_key`` if set. ``overwrite``: a committed checkpoint of that name is
    replaced (written beside it, then switched in: :mod:`ckptstore.storage.replace`)
    instead of refused.
    """

    codec: Codec
    step: int | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    window: int = 8
    metadata: Mapping[str, Any] = field(default_factory=dict)
    epoch: int | None = None
    reason: str | None = None
    metrics: Mapping[str, float | None] = field(default_factory=dict)
    run_id: str | None = None
    lineage: tuple[str, ...] = ()
    manifest_key: bytes | None = field(default=None, repr=False)
    overwrite: bool = False
    full: bool = False  # incremental saves: link nothing this time (dcp.incremental)


@dataclass(frozen=True)
class PartFiles:
    """A part's ``.metadata`` (``body + head + tail``: ``MetadataCache.dumps_part``;
    ``shared`` names the body all parts share, ``ident`` body and head, while the
    coordinator reuses them) and its manifest."""

    ident: str | None
    body: bytes
    tail: bytes
    manifest: bytes
    head: bytes = b""
    shared: str | None = None
