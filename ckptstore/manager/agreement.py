"""What the ranks agree on at each step, without a blocking collective on every step.

With several ranks, every rank must take the same decisions at the same step: save or
not (a time-based policy can answer differently per rank), stop (a signal may reach one
rank only), give up (another rank's loop failed). Agreeing with a blocking all-reduce
per step costs a round trip of the whole ring (~20-100 ms at 1,000 ranks on gloo).

:class:`StepAgreement` agrees one step late instead: each step starts an asynchronous
all-reduce of this step's flags and collects the previous step's, which has long
finished by then; what it says (a save, a stop, an abort) is acted on at this step, on
every rank alike. A save whose policy answers the same on every rank without asking
(every N steps, at given steps, every N epochs) is taken at once, as in one process. A
stop signal therefore stops every rank one step after it arrives; an abort (a rank's
loop failed) stops the others one step after they last met it.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

from ckptstore.manager.policies import EPOCH, INTERVAL

_REASON_CODES = {None: 0, INTERVAL: 1, EPOCH: 2}
_CODE_REASONS = {v: k for k, v in _REASON_CODES.items()}
Flags = tuple[str | None, int | None]


class StepAgreement:
    """The agreements of one manager's ranks over its dedicated gloo group."""

    def __init__(self, group: Any) -> None:
        self._group = group
        self._pending: tuple[Any, torch.Tensor] | None = None
        # Two flag tensors, used in turn: the one in flight is never written to. Reused
        # rather than made each step (the per-step cost is what matters here).
        self._buffers = (torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
        self._turn = 0

    def now(self, reason: str | None, stop: int | None) -> Flags:
        """Agree at once (a blocking all-reduce): the largest reason and stop code win.
        Folds in a step's agreement still in flight."""
        late_reason, late_stop = self.collect()
        flags = _encode(reason, stop)
        flags = torch.maximum(flags, _encode(late_reason, late_stop))
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        return _decode(flags)

    def start(self, reason: str | None, stop: int | None) -> None:
        """Begin this step's agreement of ``reason`` and ``stop``, collected (with
        :meth:`collect`) at the next step; every rank begins one per step."""
        self._turn ^= 1
        flags = self._buffers[self._turn]
        flags[0], flags[1] = _REASON_CODES.get(reason, 1), stop or 0
        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending = (work, flags)

    def collect(self, timeout_s: float | None = None) -> Flags:
        """The agreement in flight, waited for (None, None when there is none)."""
        if self._pending is None:
            return None, None
        work, flags = self._pending
        self._pending = None
        if timeout_s is None:
            work.wait()
        else:
            work.wait(datetime.timedelta(seconds=timeout_s))
        return _decode(flags)


def _encode(reason: str | None, stop: int | None) -> torch.Tensor:
    return torch.tensor([_REASON_CODES.get(reason, 1), stop or 0], dtype=torch.int64)


def _decode(flags: torch.Tensor) -> Flags:
    code, stop = flags.tolist()
    return _CODE_REASONS[code], stop or None
