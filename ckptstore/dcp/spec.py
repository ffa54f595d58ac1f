"""What one save is asked to write (:class:`SaveSpec`) and what a node-local part of it
came to (:class:`PartFiles`): plain values that the engine hands the writer
(:mod:`ckptstore.dcp.writer`) and gets back."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ckptstore.codecs import Codec
from ckptstore.format.manifest import FileEntry, Manifest, Part
from ckptstore.format.shard import DEFAULT_CHUNK_BYTES
from ckptstore.version import __version__


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

    def manifest(
        self,
        files: dict[str, FileEntry],
        raw_bytes: int,
        world_size: int,
        part: Part | None,
        linked: dict[str, str],
    ) -> Manifest:
        """The manifest of a save with this spec that wrote ``files`` (``part``: a
        node-local part's; ``linked``: files first written by earlier checkpoints)."""
        return Manifest(
            step=self.step,
            world_size=world_size,
            codec=self.codec.get_config(),
            files=files,
            raw_bytes=raw_bytes,
            stored_bytes=sum(f.size_bytes for f in files.values()),
            created_unix_s=time.time(),
            metadata=dict(self.metadata),
            versions={"ckptstore": __version__, "torch": torch.__version__.split("+")[0]},
            epoch=self.epoch,
            reason=self.reason,
            metrics=dict(self.metrics),
            run_id=self.run_id,
            lineage=self.lineage,
            part=part,
            linked=linked,
        )


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
