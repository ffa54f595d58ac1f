"""The layout of a state dict: planned once, then reused while it does not change.

Planning a state (DCP's flattening, the checks of every entry, a place in the arena for
every tensor) costs several µs per tensor in Python. Saving the same model every time
is the common case, so :class:`LayoutCache` keeps the last plan and, for the next state,
only checks in one pass that it still has that layout: the same nesting and keys (and
key types), and per tensor the same type, dtype, shape, device, layout and DTensor
spec; if some tensors were tied (one storage, copied once), also the same strides and
the same ties (``data_ptr``). Anything else (a key added or renamed, a dtype or shape
changed, a value that became a container) plans the state again from scratch, with
every check and its error message.

:func:`resolve_stateful` is DCP's ``_stateful_to_state_dict`` without its logging
decorator, which cost ~100 µs per top-level entry (log records, a uuid, and a
``getattr_static`` per ``isinstance(x, Stateful)``).
"""

from __future__ import annotations

import abc
import contextlib
import gc
import operator
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from itertools import compress
from typing import Any

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from ckptstore.dcp.packs import SMALL_ALIGN, SMALL_BYTES  # small tensors start at a multiple of it
from ckptstore.errors import UnsupportedStateError
from ckptstore.format.shard_index import dtype_name

PAGE = 4096
_PAGE_ALIGN_FROM = 1 << 20  # tensors this big start on a page boundary (O_DIRECT)


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """The cyclic garbage collector paused: a pass per tensor allocates a few small
    objects per tensor, and with many tensors alive each collection those allocations
    trigger walks them all (at 40,000 tensors it tripled the time, and made it erratic).
    Turned back on afterwards only if it was on; an overlapping pause in another thread
    cannot leave it off."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# ---- Stateful ----------------------------------------------------------------------------
_NEVER, _BY_DICT, _ASK = 0, 1, 2
_KINDS: dict[type, int] = {}
_ATTRS = ("state_dict", "load_state_dict")


def resolve_stateful(state_dict: dict[Any, Any]) -> dict[Any, Any]:
    """A shallow copy of ``state_dict`` where each top-level value that is a DCP
    ``Stateful`` is replaced by its ``state_dict()``: DCP's ``_stateful_to_state_dict``."""
    return {
        key: elem.state_dict() if is_stateful(elem) else elem for key, elem in state_dict.items()
    }


def is_stateful(obj: Any) -> bool:
    """``isinstance(obj, Stateful)``, decided from the type alone where it can be.

    The protocol check looks each method up with ``inspect.getattr_static`` (~25 µs):
    on the instance's ``__dict__``, then its class. A class that has neither method and
    is not registered with the protocol is Stateful only through an instance dict holding
    both, so a tensor (or a dict, list, number) is answered without the slow check.
    """
    cls = type(obj)
    kind = _KINDS.get(cls)
    if kind is None:
        kind = _KINDS[cls] = _kind(cls)
    if kind != _ASK and obj.__class__ is cls:
        if kind == _NEVER:
            return False
        attrs = getattr(obj, "__dict__", None)
        if type(attrs) is dict and ("state_dict" not in attrs or "load_state_dict" not in attrs):
            return False
    return isinstance(obj, Stateful)


def _kind(cls: type) -> int:
    if any(name in vars(k) for k in cls.__mro__ for name in _ATTRS):
        return _ASK
    try:
        if abc.ABCMeta.__subclasscheck__(Stateful, cls):  # type: ignore[arg-type]
            return _ASK
    except TypeError:
        return _ASK
    return _BY_DICT if getattr(cls, "__dictoffset__", 1) != 0 else _NEVER


# ---- flattening and its checks -----------------------------------------------------------
def flatten_checked(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """DCP's ``flatten_state_dict`` after :func:`check_structure`; two entries that
    flatten to one name (``{"a.b": t, "a": {"b": t}}``: one would replace the other)
    are an :class:`~ckptstore.errors.UnsupportedStateError` too."""
    check_structure(state_dict)
    try:
        flat, mappings = flatten_state_dict(state_dict)
    except ValueError as exc:
        if "duplicated flatten key" not in str(exc):
            raise
        name = str(exc).rsplit(" ", 1)[-1]
        raise UnsupportedStateError(
            f"two entries of the state_dict flatten to the same name {name!r} (a key with a "
            "'.' next to a nested one, say): one would silently replace the other; rename one"
        ) from None
    return flat, dict(mappings)


def check_structure(state_dict: Any) -> None:
    """Refuse what DCP's flattening cannot round-trip, before it tries, naming the key.

    A container that holds itself (DCP recurses until ``RecursionError``); a dict that
    mixes string keys with others (``{"a": t, 0: t}``: every key is written as a
    string, and the stored ``"0"`` then matches no key on load).
    """
    _walk(state_dict, (), set())


def _walk(obj: Any, path: tuple[Any, ...], open_ids: set[int]) -> None:
    if not isinstance(obj, (dict, list, tuple)):
        return
    where = "state_dict" + "".join(f"[{p!r}]" for p in path)
    if id(obj) in open_ids:
        raise UnsupportedStateError(
            f"{where} contains itself (a reference cycle), which cannot be saved; "
            "save a copy without the cycle"
        )
    items: Any = enumerate(obj)
    if isinstance(obj, dict):
        if len({type(k) is str for k in obj}) > 1:
            odd = [k for k in obj if type(k) is not str][:3]
            raise UnsupportedStateError(
                f"{where} mixes string keys with keys of other types ({odd!r}): all are "
                "stored as strings and the others would not match on load; use one key type"
            )
        items = obj.items()
    open_ids.add(id(obj))
    try:
        for key, value in items:
            _walk(value, (*path, key), open_ids)
    finally:
        open_ids.discard(id(obj))


def check_tensor(fqn: str, t: torch.Tensor) -> None:
    problem = None
    if t.layout != torch.strided:
        problem = f"has layout {t.layout}; convert it with .to_dense()"
    elif t.is_quantized:
        problem = "is quantized; save its int_repr() and quantization parameters instead"
    elif t.device.type == "meta":
        problem = "is on the meta device and has no data"
    elif getattr(t, "is_nested", False):
        problem = "is a nested tensor; save its components"
    else:
        try:
            dtype_name(t.dtype)
        except ValueError:
            problem = f"has dtype {t.dtype}, which ckptstore does not store"
    if problem:
        raise UnsupportedStateError(f"state_dict[{fqn!r}] {problem}")


# ---- the plan ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where every entry of a flattened state goes; reused while the layout holds."""

    fqns: tuple[str, ...]  # every flattened entry, in DCP's order
    mappings: dict[str, Any]  # DCP's flatten mappings
    tensor_pos: tuple[int, ...]  # which entries are tensors (or DTensors)
    value_pos: tuple[int, ...]  # which are other values
    tensor_fqns: tuple[str, ...]
    value_fqns: tuple[str, ...]
    is_dtensor: tuple[bool, ...] | None  # per tensor; None when there is no DTensor
    slots: tuple[int, ...]  # per tensor: its arena slot (tied tensors share); -1 if empty
    nbytes: tuple[int, ...]
    first: tuple[int, ...]  # the tensors whose data is copied: the first of each slot
    signature: tuple[Any, ...]  # what an arena made for this layout is keyed on
    offsets: tuple[int, ...]  # per slot
    total: int
    cuda: bool  # some tensor lives on a GPU
    # what the next state is compared with
    template: Any  # the nesting (see _template); None: not cacheable, always re-plan
    types: list[type]
    metas: list[Any]  # (dtype, shape, device, layout) of each local tensor
    tied: bool  # some tensors share a slot
    strides: list[tuple[int, ...]]
    contiguous: list[bool]
    odd: tuple[int, ...]  # the tensors that are not contiguous: their strides are compared
    ptrs: list[int]
    specs: list[Any] | None  # DTensor specs, per DTensor
    tied_at: tuple[int, ...] = ()  # the tensors that share a slot with another
    # the tensors too large to pack (dcp.packs): incremental saves read their counters
    large: tuple[int, ...] = ()


def plan_layout(resolved: dict[str, Any]) -> tuple[Layout, list[Any]]:
    """Flatten, check and plan a state (after :func:`resolve_stateful`), from scratch.

    Returns the layout and the flattened entries, in ``layout.fqns`` order.
    """
    flat, mappings = flatten_checked(resolved)
    objs = list(flat.values())
    tensor_pos: list[int] = []
    locals_: list[torch.Tensor] = []
    dtensor_flags: list[bool] = []
    for i, (fqn, obj) in enumerate(flat.items()):
        if type(obj).__name__ == "ShardedTensor":  # a torch.Tensor subclass: ask first
            raise UnsupportedStateError(
                f"state_dict[{fqn!r}] is a ShardedTensor, which ckptstore does not stage; "
                "use DTensor (FSDP2 / torch.distributed.tensor) instead"
            )
        if isinstance(obj, DTensor):
            tensor = obj._local_tensor
        elif isinstance(obj, torch.Tensor):
            tensor = obj
        else:
            continue
        check_tensor(fqn, tensor)
        tensor_pos.append(i)
        locals_.append(tensor)
        dtensor_flags.append(tensor is not obj)
    fqns = tuple(flat)
    metas = list(map(_META, locals_))
    strides = [t.stride() for t in locals_]
    contiguous = [t.is_contiguous() for t in locals_]
    ptrs = _tie_ptrs(locals_)
    slots, first, offsets, total = _assign(metas, strides, ptrs)
    nbytes = tuple(t.numel() * t.element_size() for t in locals_)
    signature = tuple(
        (fqns[i], str(m[0]), tuple(m[1])) if s < 0 else (fqns[i], str(m[0]), tuple(m[1]), s)
        for i, m, s in zip(tensor_pos, metas, slots, strict=True)
    )
    tset = set(tensor_pos)
    value_pos = tuple(i for i in range(len(fqns)) if i not in tset)
    any_dt = any(dtensor_flags)
    template = _template(resolved)
    if template is _UNCACHEABLE:
        template = None
    layout = Layout(
        fqns=fqns,
        mappings=mappings,
        tensor_pos=tuple(tensor_pos),
        value_pos=value_pos,
        tensor_fqns=tuple(fqns[i] for i in tensor_pos),
        value_fqns=tuple(fqns[i] for i in value_pos),
        is_dtensor=tuple(dtensor_flags) if any_dt else None,
        slots=tuple(slots),
        nbytes=nbytes,
        first=tuple(first),
        signature=signature,
        offsets=tuple(offsets),
        total=total,
        cuda=any(m[2].type == "cuda" for m in metas),
        template=template,
        types=[type(objs[i]) for i in tensor_pos],
        metas=metas,
        strides=strides,
        contiguous=contiguous,
        odd=tuple(k for k, c in enumerate(contiguous) if not c),
        tied=sum(1 for s in slots if s >= 0) != len(first),
        ptrs=ptrs,
        specs=[objs[i]._spec for i in tensor_pos if isinstance(objs[i], DTensor)]
        if any_dt
        else None,
        tied_at=_tied_at(slots),
        large=tuple(k for k, n in enumerate(nbytes) if n > SMALL_BYTES),
    )
    return layout, objs


def _tied_at(slots: list[int]) -> tuple[int, ...]:
    counts = Counter(slots)
    return tuple(k for k, s in enumerate(slots) if s >= 0 and counts[s] > 1)


def _assign(
    metas: list[Any], strides: list[tuple[int, ...]], ptrs: list[int]
) -> tuple[list[int], list[int], list[int], int]:
    """Arena slots: one per distinct tensor (tied tensors share one), aligned."""
    slots: list[int] = []
    first: list[int] = []
    offsets: list[int] = []
    seen: dict[tuple[Any, ...], int] = {}
    total = 0
    for i, ((dtype, shape, device, _), stride, ptr) in enumerate(
        zip(metas, strides, ptrs, strict=True)
    ):
        nbytes = shape.numel() * dtype.itemsize
        if nbytes == 0:
            slots.append(-1)
            continue
        key = (ptr, dtype, tuple(shape), tuple(stride), device)
        slot = seen.get(key)
        if slot is None:
            align = PAGE if nbytes >= _PAGE_ALIGN_FROM else SMALL_ALIGN
            total += (-total) % align
            slot = seen[key] = len(offsets)
            offsets.append(total)
            first.append(i)
            total += nbytes
        slots.append(slot)
    return slots, first, offsets, total


# ---- the cache -----------------------------------------------------------------------------
_DICT, _LIST = 0, 1
_UNCACHEABLE = ("uncacheable",)
_META = operator.attrgetter("dtype", "shape", "device", "layout")
_CONTIGUOUS = operator.methodcaller("is_contiguous")


def _tie_ptrs(tensors: list[torch.Tensor]) -> list[int]:
    """Each tensor's storage address, which ties tensors that share their data; a view
    with a lazy conjugate or negative bit reads other values from the same bytes, so it
    gets a key of its own (never an address) and is never tied."""
    ptrs = list(map(_PTR, tensors))
    if len(set(ptrs)) < len(ptrs):  # some share bytes: only those can be tied
        shared = {p for p, n in Counter(ptrs).items() if n > 1}
        for i in compress(range(len(ptrs)), map(shared.__contains__, ptrs)):
            if tensors[i].is_conj() or tensors[i].is_neg():
                ptrs[i] = -(i + 1)
    return ptrs  # (a reused plan checks its tied tensors instead: LayoutCache._reuse)


_PTR = operator.methodcaller("data_ptr")


class LayoutCache:
    """The layout of the last state planned, and the check that a state still has it."""

    def __init__(self) -> None:
        self._last: Layout | None = None

    def plan(self, resolved: dict[str, Any]) -> tuple[Layout, list[Any]]:
        """``plan_layout(resolved)``, reusing the last layout if ``resolved`` has it."""
        with no_gc():
            last = self._last
            if last is not None and last.template is not None:
                hit = self._reuse(last, resolved)
                if hit is not None:
                    return hit
            layout, objs = plan_layout(resolved)
            self._last = layout
            return layout, objs

    def _reuse(self, last: Layout, resolved: dict[str, Any]) -> tuple[Layout, list[Any]] | None:
        """``last`` and the entries of ``resolved`` if it has that layout, else None."""
        objs: list[Any] = []
        if not _collect(resolved, last.template, objs) or len(objs) != len(last.fqns):
            return None
        if not all(_plain_value(objs[i]) for i in last.value_pos):
            return None
        tensors = [objs[i] for i in last.tensor_pos] if last.value_pos else objs
        if list(map(type, tensors)) != last.types:
            return None
        if last.is_dtensor is not None:
            dts = [t for t in tensors if isinstance(t, DTensor)]
            if [t._spec for t in dts] != last.specs:
                return None
            tensors = [t._local_tensor if isinstance(t, DTensor) else t for t in tensors]
        try:
            if list(map(_META, tensors)) != last.metas:
                return None
            if not last.tied:
                # No tensors shared a slot: each is copied into its own, whatever its
                # strides or storage, so only dtype, shape, device and layout matter. A
                # pair that became tied now is saved twice, as a fresh plan would too
                # (the arena only would hold it once).
                return last, objs
            if list(map(_CONTIGUOUS, tensors)) != last.contiguous or any(
                tensors[k].stride() != last.strides[k] for k in last.odd
            ):
                return None
            ptrs = list(map(_PTR, tensors))
        except RuntimeError:  # nested tensors and the like: re-plan, which says what is wrong
            return None
        if ptrs != last.ptrs:  # other tensors: are the same ones tied as before?
            slots, _, _, _ = _assign(last.metas, last.strides, ptrs)
            if tuple(slots) != last.slots:
                return None
            last = self._last = replace(last, ptrs=ptrs)
        if any(tensors[k].is_conj() or tensors[k].is_neg() for k in last.tied_at):
            return None  # a lazy view shares bytes, not values: re-plan (it is not tied)
        return last, objs


def _template(value: Any) -> Any:
    """The nesting DCP's flattening walks (``traverse_state_dict``): a dict is walked; a
    list only if it holds a tensor or a container that is walked; all else is an entry
    (``None``). Only ``dict``s keyed by ``str`` or ``int`` are cached: anything else
    makes the whole template ``_UNCACHEABLE``."""
    if isinstance(value, Mapping):
        if not isinstance(value, dict):
            return _UNCACHEABLE
        keys = tuple(value)
        ktypes = tuple(map(type, keys))
        if any(t is not str and t is not int for t in ktypes):
            return _UNCACHEABLE
        children = tuple(_template(v) for v in value.values())
        if _UNCACHEABLE in children:
            return _UNCACHEABLE
        leaves_only = all(c is None for c in children)
        return (_DICT, type(value), keys, ktypes, None if leaves_only else children)
    if isinstance(value, list) and not _dcp_terminal(value):
        children = tuple(_template(v) for v in value)
        if _UNCACHEABLE in children:
            return _UNCACHEABLE
        return (_LIST, type(value), len(value), None, children)
    return None


def _collect(obj: Any, node: Any, out: list[Any]) -> bool:
    """Add the entries of ``obj`` in flattening order to ``out``, if it is nested like
    ``node``; False if it is not."""
    kind, cls, keys, ktypes, children = node
    if type(obj) is not cls:
        return False
    if kind == _DICT:
        if len(obj) != len(keys) or tuple(obj) != keys or tuple(map(type, obj)) != ktypes:
            return False
        values: Any = obj.values()
    else:
        if len(obj) != keys:
            return False
        values = obj
    if children is None:
        out.extend(values)
        return True
    for value, child in zip(values, children, strict=True):
        if child is None:
            out.append(value)
        elif not _collect(value, child, out):
            return False
    return True


def _plain_value(value: Any) -> bool:
    """An entry that was a plain value is still one, and still passes the checks."""
    if isinstance(value, (torch.Tensor, Mapping)) or type(value).__name__ == "ShardedTensor":
        return False
    if isinstance(value, list) and not _dcp_terminal(value):
        return False
    if isinstance(value, (list, tuple)):
        try:
            check_structure(value)
        except UnsupportedStateError:
            return False
    return True


def _dcp_terminal(value: Any) -> bool:
    """DCP's ``_is_terminal`` for a list: it holds no tensor and nothing walked."""
    for entry in value:
        if isinstance(entry, Mapping):
            return False
        if isinstance(entry, list) and not _dcp_terminal(entry):
            return False
        if isinstance(entry, torch.Tensor):
            return False
    return True
