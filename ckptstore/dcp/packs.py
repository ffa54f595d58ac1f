"""Small tensors saved in groups: one DCP item, one shard entry, one checksum per group.

A state of tens of thousands of small tensors (unfused MoE experts, norms and biases,
per-parameter optimizer state) spends most of a save in per-tensor work that has
nothing to do with its bytes: DCP's planning, a write item, a shard-index entry and a
checksum each. When a state has at least :data:`PACK_FROM` plain tensors of at most
:data:`SMALL_BYTES`, :func:`pack` (on the writer thread) replaces them, before DCP sees
the state, by byte tensors of up to :data:`PACK_BYTES` named ``__ckptstore_pack_<hash>``
(the hash of the members' names, dtypes and shapes: ranks holding the same replicated
tensors make the same packs, which DCP then writes once). A pack never spans two
top-level keys, so one rank's own entries (``extras_by_rank``, ``rng``) do not mix with
shared ones. A pack is a copy: while a save writes, the packed tensors' bytes are held
twice (the state's larger tensors are not copied).

The checkpoint's ``.metadata`` still lists every member as the tensor it is:
:func:`expand` (on the coordinator, before the metadata is written) replaces each pack
by its members, each stored at ``{"file", "item", "range": [offset, nbytes]}`` inside
the pack's shard item. Readers that honour ``range`` (ckptstore's, from this version
on) see the state as saved; nothing else in the format changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import xxhash
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from ckptstore.format.shard import dtype_name

PACK_PREFIX = "__ckptstore_pack_"
SMALL_BYTES = 64 << 10  # tensors up to this size are packed ...
PACK_FROM = 256  # ... when a state has at least this many of them
PACK_BYTES = 8 << 20  # a pack's size, at most (a member never straddles two)


class Member(NamedTuple):
    fqn: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # in the pack, bytes
    nbytes: int


Packs = dict[str, tuple[Member, ...]]  # pack fqn -> its members, in order


def _packable(value: Any) -> bool:
    return (
        type(value) is torch.Tensor
        and value.device.type == "cpu"
        and value.nbytes <= SMALL_BYTES
        and value.is_contiguous()
        and not value.is_conj()
        and not value.is_neg()
    )


def pack(flat: dict[str, Any], mappings: Mapping[str, Any]) -> tuple[dict[str, Any], Packs]:
    """``flat`` with its small tensors replaced by packs (or unchanged, with no packs,
    when it has fewer than :data:`PACK_FROM` of them), and the packs' members."""
    small = [fqn for fqn, v in flat.items() if _packable(v)]
    if len(small) < PACK_FROM:
        return flat, {}
    groups: list[list[str]] = []
    size = 0
    top: Any = object()
    for fqn in small:
        path = mappings.get(fqn)
        here = path[0] if isinstance(path, tuple) and path else fqn.split(".", 1)[0]
        nbytes = flat[fqn].nbytes
        if not groups or here != top or size + nbytes > PACK_BYTES:
            groups.append([])
            size, top = 0, here
        groups[-1].append(fqn)
        size += nbytes
    packed = set(small)
    out = {k: v for k, v in flat.items() if k not in packed}
    packs: Packs = {}
    names_of: dict[torch.dtype, str] = {}
    for names in groups:
        members: list[Member] = []
        parts: list[torch.Tensor] = []
        key: list[str] = []
        offset = 0
        for fqn in names:
            t = flat[fqn]
            shape = tuple(t.shape)
            n = t.nbytes
            members.append(Member(fqn, t.dtype, shape, offset, n))
            parts.append(t.reshape(-1).view(torch.uint8))
            dname = names_of.get(t.dtype) or names_of.setdefault(t.dtype, dtype_name(t.dtype))
            key.append(f"{fqn}\0{dname}\0{shape}")
            offset += n
        name = f"{PACK_PREFIX}{xxhash.xxh3_64_hexdigest(chr(10).join(key).encode())}"
        out[name] = torch.cat(parts)
        packs[name] = tuple(members)
    return out, packs


def expand(metadata: Metadata, packs: Packs) -> None:
    """Replace each pack in ``metadata`` (written, with its storage entry) by its members."""
    items = metadata.state_dict_metadata
    storage = metadata.storage_data
    planner_data = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    # Members of one dtype and shape share their (read-only) metadata objects: fewer to
    # build and to pickle (pickle stores a shared object once).
    shared: dict[tuple[torch.dtype, tuple[int, ...]], TensorStorageMetadata] = {}
    for name, members in packs.items():
        if name not in items:
            continue  # another rank's pack, written under the same name once
        items.pop(name)
        planner_data.pop(name, None)
        where = storage.pop(MetadataIndex(name, torch.Size([0])))
        for m in members:
            if m.fqn in items:
                continue  # a replicated tensor two ranks packed differently: one copy
            md = shared.get((m.dtype, m.shape))
            if md is None:
                zeros = torch.Size([0] * len(m.shape))
                md = shared[(m.dtype, m.shape)] = TensorStorageMetadata(
                    TensorProperties(dtype=m.dtype),
                    torch.Size(m.shape),
                    [ChunkStorageMetadata(offsets=zeros, sizes=torch.Size(m.shape))],
                )
            items[m.fqn] = md
            storage[MetadataIndex(m.fqn, md.chunks[0].offsets)] = type(where)(
                {**where, "range": [m.offset, m.nbytes]}
            )


def member_range(storage: Mapping[str, Any], nbytes: int) -> tuple[int, int] | None:
    """``(offset, nbytes)`` of a packed tensor's bytes inside its item; None if the
    entry is a whole item. Raises ``ValueError`` for a range that is not two
    non-negative integers or does not hold ``nbytes``."""
    found = storage.get("range")
    if found is None:
        return None
    if (
        not isinstance(found, list)
        or len(found) != 2
        or not all(type(x) is int and x >= 0 for x in found)
        or found[1] != nbytes
    ):
        raise ValueError(f"bad range {found!r} for {nbytes} B")
    return found[0], found[1]
