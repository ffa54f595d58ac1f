"""An arena: one block of host memory that a state is staged into, with the layout it
was made for, and the views into it by which the writer saves it
(:class:`~ckptstore.engine.stager.StagingPool` hands them out and reuses them).
"""

from __future__ import annotations

from typing import Any

import torch

from ckptstore.dcp.raw import tensor_bytes
from ckptstore.engine import unchanged
from ckptstore.engine.host_buffers import HostBuffer
from ckptstore.engine.layout_cache import PAGE, Layout


class Arena:
    """One block of host memory plus the layout it was made for."""

    def __init__(
        self,
        signature: tuple[Any, ...],
        offsets: tuple[int, ...],
        nbytes: int,
        pin: bool,
        device: int | None = None,
    ) -> None:
        self.signature = signature
        self.offsets = offsets
        self.nbytes = nbytes
        # Made by the first save into this arena, reused by the next (same layout):
        self.views: list[torch.Tensor] | None = None  # per tensor of the layout
        self.dsts: list[torch.Tensor] = []  # the views copied into: one per slot
        self.held = unchanged.Held()  # what its slots hold, by digest (incremental saves)
        self._raws: dict[int, tuple[torch.Tensor, Any]] | None = None  # (raws())
        self._host = HostBuffer(nbytes, pin=pin, device=device)
        self.buffer = self._host.tensor
        assert self.buffer.data_ptr() % PAGE == 0 or nbytes == 0

    @property
    def pinned(self) -> bool:
        return self._host.pinned

    def close(self) -> None:
        """Give the memory back (unpinned at once; unmapped with the last view)."""
        self.views = None
        self.dsts = []
        self._raws = None
        self._host.close()
        self.buffer = self._host.tensor

    def views_for(self, layout: Layout) -> list[torch.Tensor]:
        """A view of this arena per tensor of ``layout`` (a layout it was made for)."""
        if self.views is None:
            views: list[torch.Tensor] = []
            by_slot: dict[int, torch.Tensor] = {}
            for k, slot in enumerate(layout.slots):
                dtype, shape, _, _ = layout.metas[k]
                if slot < 0:
                    views.append(torch.empty(shape, dtype=dtype))
                    continue
                view = by_slot.get(slot)
                if view is None:
                    off = self.offsets[slot]
                    view = self.buffer[off : off + layout.nbytes[k]].view(dtype).view(shape)
                    by_slot[slot] = view
                views.append(view)
            self.dsts = [views[k] for k in layout.first]
            self.views = views
        return self.views

    def raws(self) -> dict[int, tuple[torch.Tensor, Any]]:
        """id(view) -> (the view, ``tensor_bytes(view)``), for each of :attr:`views`: an
        incremental save's writer looks its staged tensors up here instead of making
        their arrays again (~4 us a tensor; ``IncrementalCache.bytes_of`` checks that
        what it found is the very tensor it looked up)."""
        if self._raws is None and self.views is not None:
            self._raws = {id(v): (v, tensor_bytes(v)) for v in self.views}
        return self._raws or {}
