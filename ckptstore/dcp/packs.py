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
shared ones. A staged state's small tensors lie in its staging arena one after the
other, so a pack is a view of the arena (the alignment gaps between members, under
64 bytes each and zero, are written too); grouping and naming are done
once per staged layout (:class:`PackCache`). Elsewhere (a synchronous save's own
tensors, members the arena does not hold in order) a pack is a copy.

The checkpoint's ``.metadata`` still lists every member as the tensor it is:
:func:`expand` (on the coordinator, before the metadata is written) replaces each pack
by its members, each stored at ``{"file", "item", "range": [offset, nbytes]}`` inside
the pack's shard item. Readers that honour ``range`` (ckptstore's, from this version
on) see the state as saved; nothing else in the format changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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

from ckptstore.dcp import metadata as md_format
from ckptstore.format.shard_index import dtype_name

PACK_PREFIX = "__ckptstore_pack_"
SMALL_BYTES = 64 << 10  # tensors up to this size are packed ...
PACK_FROM = 256  # ... when a state has at least this many of them
PACK_BYTES = 8 << 20  # a pack's size, at most (a member never straddles two)
# Where a staging arena starts each small tensor: at a multiple of this (engine's
# layout_cache uses it). A member may start less than this after the end of the one
# before it in a pack that is a view: a gap holding another tensor is at least this.
SMALL_ALIGN = 64
_GAP = SMALL_ALIGN


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


class _Group(NamedTuple):
    name: str
    members: tuple[Member, ...]
    span: tuple[int, int] | None  # the arena bytes the members fill, in order; None: copied
    probe: tuple[str, int] | None  # a member with bytes, and where in the arena it starts


class _Plan(NamedTuple):
    key: Any  # the staged layout it was made for (its arena offsets are the layout's)
    rest: tuple[str, ...]  # the entries not packed
    groups: tuple[_Group, ...]


class PackCache:
    """The packs of the last staged layout, reused while the layout holds (one per
    checkpointer; a save of the same state again skips grouping and naming)."""

    def __init__(self) -> None:
        self.plan: _Plan | None = None


def pack(
    flat: dict[str, Any],
    mappings: Mapping[str, Any],
    *,
    arena: torch.Tensor | None = None,
    layout: Any = None,
    cache: PackCache | None = None,
    skipped: frozenset[str] = frozenset(),
) -> tuple[dict[str, Any], Packs]:
    """``flat`` with its small tensors replaced by packs (or unchanged, with no packs,
    when it has fewer than :data:`PACK_FROM` of them), and the packs' members.

    ``arena``: the staging buffer ``flat``'s tensors are views of. A group whose members
    lie in it one after the other (apart from alignment gaps, which stay zero) is a view
    of it, not a copy. ``layout`` and ``cache``: the staged layout ``flat`` was made
    with (its identity is the key) and where the plan of the last one is kept.
    ``skipped``: the layout's tensors left out of ``flat`` (another rank writes them):
    the last plan of the layout still applies, less the groups left out whole; a group
    left out in part is packed anew from what is left.
    """
    plan = cache.plan if cache is not None else None
    if plan is None or layout is None or arena is None or plan.key is not layout:
        plan = _plan(flat, mappings, arena)
        if cache is not None and layout is not None and arena is not None and not skipped:
            cache.plan = plan = plan._replace(key=layout)
        skipped = frozenset()  # a plan of flat itself
    if not plan.groups:
        return flat, {}
    out = {k: flat[k] for k in plan.rest if k not in skipped}
    packs: Packs = {}
    for group in plan.groups:
        if skipped:
            kept = [m.fqn for m in group.members if m.fqn not in skipped]
            if not kept:
                continue
            if len(kept) < len(group.members):
                group = _group(kept, [flat[f] for f in kept], None, {})
        span, probe = group.span, group.probe
        if (
            arena is not None
            and span is not None
            and probe is not None
            and flat[probe[0]].data_ptr() - arena.data_ptr() == probe[1]
        ):
            out[group.name] = arena[span[0] : span[1]]
        else:
            out[group.name] = _copied(flat, group)
        packs[group.name] = group.members
    return out, packs


def _copied(flat: dict[str, Any], group: _Group) -> torch.Tensor:
    """The members of ``group`` copied into one byte tensor at their offsets."""
    last = group.members[-1]
    if group.span is None:
        return torch.cat([flat[m.fqn].reshape(-1).view(torch.uint8) for m in group.members])
    out = torch.zeros(last.offset + last.nbytes, dtype=torch.uint8)
    for m in group.members:
        out[m.offset : m.offset + m.nbytes] = flat[m.fqn].reshape(-1).view(torch.uint8)
    return out


def _plan(flat: dict[str, Any], mappings: Mapping[str, Any], arena: torch.Tensor | None) -> _Plan:
    small = [fqn for fqn, v in flat.items() if _packable(v)]
    if len(small) < PACK_FROM:
        return _Plan(None, (), ())
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
    names_of: dict[torch.dtype, str] = {}
    made = [_group(names, [flat[fqn] for fqn in names], arena, names_of) for names in groups]
    rest = tuple(k for k in flat if k not in packed)
    return _Plan(None, rest, tuple(made))


def _group(
    names: list[str],
    tensors: list[torch.Tensor],
    arena: torch.Tensor | None,
    names_of: dict[torch.dtype, str],
) -> _Group:
    """The pack of ``tensors`` (named ``names``): a view of ``arena`` where they lie in
    it in order, else copied one after another."""
    placed = _place(tensors, arena)
    span, probe, where = None, None, None
    if placed is not None:
        start, end, where = placed
        span = (start, end)
        first = next(f for f, t in zip(names, tensors, strict=True) if t.nbytes)
        probe = (first, start)  # the first member with bytes starts the span
    members: list[Member] = []
    key: list[str] = []
    offset = 0
    for k, (fqn, t) in enumerate(zip(names, tensors, strict=True)):
        shape = tuple(t.shape)
        if where is not None:
            offset = where[k]
        members.append(Member(fqn, t.dtype, shape, offset, t.nbytes))
        dname = names_of.get(t.dtype) or names_of.setdefault(t.dtype, dtype_name(t.dtype))
        key.append(f"{fqn}\0{dname}\0{shape}\0{offset}")
        offset += t.nbytes
    name = f"{PACK_PREFIX}{xxhash.xxh3_64_hexdigest(chr(10).join(key).encode())}"
    return _Group(name, tuple(members), span, probe)


def _place(
    tensors: list[torch.Tensor], arena: torch.Tensor | None
) -> tuple[int, int, list[int]] | None:
    """``(start, end, offsets from start)`` of ``tensors`` in ``arena`` if they lie in it
    in order, each less than an alignment gap after the one before (an empty tensor sits
    where the one before ends); else None."""
    if arena is None or arena.numel() == 0:
        return None
    base, end = arena.data_ptr(), arena.data_ptr() + arena.numel()
    start = at = -1
    where: list[int] = []
    for t in tensors:
        if t.nbytes == 0:
            where.append(max(at - start, 0))
            continue
        p = t.data_ptr()
        if p < base or p + t.nbytes > end:
            return None
        if start < 0:
            start = at = p
        elif not at <= p < at + _GAP:
            return None
        where.append(p - start)
        at = p + t.nbytes
    if start < 0:
        return None
    return start - base, at - base, where


def expand(metadata: Metadata, packs: Packs) -> None:
    """Replace each pack in ``metadata`` (written, with its storage entry) by its members."""
    items = metadata.state_dict_metadata
    storage = metadata.storage_data
    planner_data = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    # Members of one dtype and shape share their (read-only) metadata objects: fewer to
    # build and to pickle (pickle stores a shared object once).
    shared: dict[tuple[torch.dtype, tuple[int, ...]], TensorStorageMetadata] = {}
    origin: dict[int, torch.Size] = {}  # one offset object per number of dimensions
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
                zeros = origin.get(len(m.shape)) or origin.setdefault(
                    len(m.shape), torch.Size([0] * len(m.shape))
                )
                md = shared[(m.dtype, m.shape)] = TensorStorageMetadata(
                    TensorProperties(dtype=m.dtype),
                    torch.Size(m.shape),
                    [ChunkStorageMetadata(offsets=zeros, sizes=torch.Size(m.shape))],
                )
            items[m.fqn] = md
            storage[md_format.metadata_index(m.fqn, md.chunks[0].offsets)] = type(where)(
                {**where, "range": [m.offset, m.nbytes]}
            )


def expander(packs: Packs, items: Mapping[str, Any]) -> Callable[[dict[Any, Any]], dict[Any, Any]]:
    """:func:`expand_entries` for one save's parts (a node-local part's changes to the
    item table): which pack each member is taken from is worked out once."""
    owner: dict[str, str] = {}

    def expand(entries: dict[Any, Any]) -> dict[Any, Any]:
        if not owner:
            owner.update(pack_owners(packs, items))
        return expand_entries(entries, packs, items, owner)

    return expand


def pack_owners(packs: Packs, items: Mapping[str, Any]) -> dict[str, str]:
    """The pack each packed tensor's entry comes from once :func:`expand` has run on
    metadata whose items are ``items``: the first pack that holds it, unless it is an
    item of its own."""
    owner: dict[str, str] = {}
    for name, members in packs.items():
        if name in items:
            for m in members:
                if m.fqn not in items:
                    owner.setdefault(m.fqn, name)
    return owner


def expand_entries(
    entries: dict[Any, Any], packs: Packs, items: Mapping[str, Any], owner: dict[str, str]
) -> dict[Any, Any]:
    """Storage ``entries`` as :func:`expand` leaves them in metadata whose items are
    ``items``: each pack's entry replaced by the entries of the members taken from that
    pack (``owner``: :func:`pack_owners`)."""
    out: dict[Any, Any] = {}
    for index, where in entries.items():
        if index.fqn not in items or index.fqn not in packs:
            out[index] = where
            continue
        for m in packs[index.fqn]:
            if owner.get(m.fqn) == index.fqn:
                offsets = torch.Size([0] * len(m.shape))
                out[md_format.metadata_index(m.fqn, offsets)] = type(where)(
                    {**where, "range": [m.offset, m.nbytes]}
                )
    return out


def member_range(storage: Mapping[str, Any], nbytes: int) -> tuple[int, int] | None:
    """``(offset, nbytes)`` of a packed tensor's bytes inside its item; None if the
    entry is a whole item. Raises ``ValueError`` for a range that is not two
    non-negative integers or does not hold ``nbytes``."""
    found = storage.get("range")
    if found is None:
        return None
    if (
        type(found) is not list
        or len(found) != 2
        or type(found[0]) is not int
        or type(found[1]) is not int
        or found[0] < 0
        or found[1] < 0
        or found[1] != nbytes
    ):
        raise ValueError(f"bad range {found!r} for {nbytes} B")
    return found[0], found[1]
