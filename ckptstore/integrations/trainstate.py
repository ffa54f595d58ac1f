"""``TrainState``: everything a training run needs to resume as if it never stopped.

Model and optimizer go through ``torch.distributed.checkpoint.state_dict``
(``get_state_dict`` / ``set_state_dict``), so plain modules, DDP and FSDP2 alike are
saved by parameter name, sharded where they are sharded, and loaded into any world size;
``get_state_dict`` also creates a fresh optimizer's state, so a new process can load
into it. Then the LR scheduler, gradient scaler, data position, counters, user extras,
and the random number generators (Python, NumPy, torch CPU, every CUDA device), per
rank: each rank saves and restores its own generators under ``rng.rank{r}`` and its own
``extras`` under ``extras_by_rank.rank{r}`` (a rank past the saved world size gets rank
0's, with a warning). Generator objects in ``extras`` (``random.Random``,
``numpy.random.Generator``) are saved by state and restored in place.

A saved state restores onto another device (CUDA to CPU and back): tensors are loaded
into the target's tensors wherever they live; CUDA generator states are skipped, with a
warning, where there is no GPU.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import xxhash
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata

from ckptstore.engine.ops import fill_from_checkpoint
from ckptstore.integrations import legacy, overlap

log = logging.getLogger("ckptstore")

# Parts of the state whose shape only the checkpoint knows: loaded as stored.
# ("extras": checkpoints written before extras were kept per rank.)
_FLEXIBLE = ("counters", "extras", "extras_by_rank", "scaler")
_GENERATOR = "__ckptstore_generator__"  # marks a generator object's saved state in extras


@dataclass
class TrainState:
    """What to save and restore. Every part is optional; pass what the run has.

    ``dataloader`` is anything with ``state_dict``/``load_state_dict`` (a
    :class:`~ckptstore.ResumableDataLoader` resumes mid-epoch exactly). ``extras`` holds
    your own numbers, strings, tensors, lists and dicts, and ``random.Random`` /
    ``numpy.random.Generator`` objects (restored in place), per rank: loop-local state
    such as the batch already fetched for the next step belongs here. ``optimizer`` may
    be a wrapper (Accelerate's ``AcceleratedOptimizer``): the optimizer inside it is
    saved. ``step``, ``epoch`` and ``best`` are kept up to date by the
    CheckpointManager and restored with the rest.
    """

    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    scaler: Any = None
    dataloader: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
    rng: bool = True
    step: int = 0  # steps done
    epoch: int = 0
    best: dict[str, float] = field(default_factory=dict)
    _optimizer_steps: int = field(default=0, init=False, repr=False, compare=False)
    _hooked: Any = field(default=None, init=False, repr=False, compare=False)
    # Set by load_target when the checkpoint has a pre-ckptstore layout (legacy.py).
    _legacy: dict[str, str] | None = field(default=None, init=False, repr=False, compare=False)
    # Background copies (overlap.py): seconds the loop waited for them, so far.
    copy_wait_s: float = field(default=0.0, init=False, compare=False)
    _copies: list[Any] = field(default_factory=list, init=False, repr=False, compare=False)
    _wait_hooks: list[Any] = field(default_factory=list, init=False, repr=False, compare=False)
    _overlap_broken: bool = field(default=False, init=False, repr=False, compare=False)

    def staging_guard(self) -> overlap.CopyGuard | None:
        """For a save that copies this state in the background: the guard that checks
        the copy, after installing the waits that keep it exact (see ``overlap.py``).
        None when that cannot be made safe: no model, or a copy was found torn before."""
        if self.model is None or self._overlap_broken:
            return None
        overlap.install_waits(self)
        return overlap.CopyGuard(self)

    # ---- step boundaries ---------------------------------------------------------------
    def boundary(self) -> dict[str, Any]:
        """The small parts of the state as they are now, at the end of a step.

        The manager takes this after every step (a few KB: data position, counters,
        scheduler, scaler, generators), so that a save after an error escaping the next
        step can still write the state *as of the last completed step*: the model and
        optimizer have not changed unless ``optimizer.step()`` ran, which
        :meth:`optimizer_steps` tells.
        """
        self._hook_optimizer()
        snap: dict[str, Any] = {
            "counters": {"step": self.step, "epoch": self.epoch, "best": dict(self.best)},
            "optimizer_steps": self._optimizer_steps,
        }
        if self.scheduler is not None:
            snap["scheduler"] = copy.deepcopy(self.scheduler.state_dict())
        if self.scaler is not None:
            snap["scaler"] = copy.deepcopy(self.scaler.state_dict())
        if self.dataloader is not None:
            snap["data"] = copy.deepcopy(self.dataloader.state_dict())
        if self.rng:
            snap["rng"] = {f"rank{_rank()}": rng_state()}
        return snap

    def optimizer_steps(self) -> int:
        """How many times ``optimizer.step()`` has run since this state first took a boundary."""
        return self._optimizer_steps

    def _hook_optimizer(self) -> None:
        if self._hooked is None and self.optimizer is not None:

            def count(*_: Any) -> None:
                self._optimizer_steps += 1

            self._hooked = base_optimizer(self.optimizer).register_step_post_hook(count)

    def state_dict(self) -> dict[str, Any]:
        """The state to save (also the target a checkpoint is loaded into)."""
        sd: dict[str, Any] = {}
        if self.optimizer is not None and self.model is None:
            raise ValueError(
                "TrainState needs the model to save its optimizer (state is keyed by parameter name)"
            )
        if self.model is not None:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

            if self.optimizer is not None:
                sd["model"], sd["optim"] = get_state_dict(
                    self.model, base_optimizer(self.optimizer)
                )
            else:
                sd["model"] = get_model_state_dict(self.model)
        if self.scheduler is not None:
            sd["scheduler"] = self.scheduler.state_dict()
        if self.scaler is not None:
            sd["scaler"] = self.scaler.state_dict()
        if self.dataloader is not None:
            sd["data"] = self.dataloader.state_dict()
        sd["counters"] = {"step": self.step, "epoch": self.epoch, "best": dict(self.best)}
        if self.extras:
            sd["extras_by_rank"] = {f"rank{_rank()}": _saved_extras(self.extras)}
        if self.rng:
            sd["rng"] = {f"rank{_rank()}": rng_state()}
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Apply a loaded state (what :meth:`state_dict` returned, filled from a checkpoint)."""
        if self._legacy is not None:
            layout, self._legacy = self._legacy, None
            legacy.apply(self, sd, layout)
            return
        if self.dataloader is not None and "data" in sd:
            # First: it is the part that can refuse (another dataset), before anything changed.
            self.dataloader.load_state_dict(sd["data"])
        if self.model is not None and "model" in sd:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

            if self.optimizer is not None and "optim" in sd:
                set_state_dict(
                    self.model,
                    base_optimizer(self.optimizer),
                    model_state_dict=sd["model"],
                    optim_state_dict=sd["optim"],
                )
            else:
                set_model_state_dict(self.model, sd["model"])
        if self.scheduler is not None and "scheduler" in sd:
            self.scheduler.load_state_dict(sd["scheduler"])
        if self.scaler is not None and "scaler" in sd:
            self.scaler.load_state_dict(sd["scaler"])
        counters = sd.get("counters") or {}
        self.step = int(counters.get("step", self.step))
        self.epoch = int(counters.get("epoch", self.epoch))
        self.best = dict(counters.get("best") or {})
        by_rank = sd.get("extras_by_rank") or {}
        if by_rank:
            mine = by_rank.get(f"rank{_rank()}")
            if mine is None:
                log.warning(
                    "the checkpoint has no extras for rank %d (saved on fewer ranks): "
                    "restored rank 0's",
                    _rank(),
                )
                mine = by_rank.get("rank0", {})
            self.extras = _restored_extras(mine, self.extras)
        elif "extras" in sd:  # written before extras were kept per rank
            self.extras = _restored_extras(sd["extras"], self.extras)
        saved = sd.get("rng") or {}
        rngs = saved.get(f"rank{_rank()}")
        if self.rng and rngs:
            set_rng_state(rngs)
        elif self.rng and saved.get("rank0"):
            seed_new_rank(saved["rank0"], _rank())

    def load_target(self, metadata: Metadata) -> dict[str, Any]:
        """What to load a checkpoint with DCP ``metadata`` into: :meth:`state_dict`, with
        the parts whose shape only the checkpoint knows (counters, extras, scaler, this
        rank's generators) shaped as stored, and parts the checkpoint lacks left out."""
        stored = {str(p[0]) for p in _paths(metadata)}
        self._legacy = legacy.layout_of(stored)
        if self._legacy is not None:  # a torch.save layout brought in by `ckptstore import`
            return legacy.target_for(metadata, self._legacy)
        target = self.state_dict()
        for part in ("scheduler", "scaler", "data", "extras_by_rank"):
            if part in target and part not in stored:
                if target[part] and not (part == "extras_by_rank" and "extras" in stored):
                    # (An empty part, such as a disabled GradScaler's, stores nothing.)
                    log.warning(
                        "the checkpoint has no %r: that part of the state is not restored",
                        part.replace("extras_by_rank", "extras"),
                    )
                target.pop(part)
        mine = f"rank{_rank()}"  # the global rank, as TrainState saves it
        for part in _FLEXIBLE:
            target.pop(part, None)
            if part != "extras_by_rank":
                fill_from_checkpoint(target, metadata, _under(part))
            # Only this rank's extras (rank 0's if it has none): with node-local disks,
            # another node's are not on this one.
            elif not fill_from_checkpoint(
                target, metadata, lambda p: p[:2] == ("extras_by_rank", mine)
            ):
                fill_from_checkpoint(
                    target, metadata, lambda p: p[:2] == ("extras_by_rank", "rank0")
                )
        target.pop("rng", None)
        if self.rng and not fill_from_checkpoint(
            target, metadata, lambda p: p[:2] == ("rng", mine)
        ):
            if fill_from_checkpoint(target, metadata, lambda p: p[:2] == ("rng", "rank0")):
                log.info(
                    "the checkpoint has no generator state for %s (saved on fewer ranks): "
                    "seeded from rank 0's and the rank number",
                    mine,
                )
            else:
                log.warning("the checkpoint has no generator state for %s: not restored", mine)
        return target


def base_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer inside wrappers (Accelerate's ``AcceleratedOptimizer``, and any
    other that keeps it as ``.optimizer`` or ``._optimizer``): the one whose state and
    hooks are real."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            return optimizer
        optimizer = inner
    return optimizer


def _saved_extras(extras: dict[str, Any]) -> dict[str, Any]:
    """``extras`` with generator objects replaced by their state (plain values)."""
    out: dict[str, Any] = {}
    for key, value in extras.items():
        if isinstance(value, random.Random):
            version, internal, gauss = value.getstate()
            out[key] = {_GENERATOR: "random.Random", "state": [version, list(internal), gauss]}
        elif type(value).__module__.startswith("numpy") and hasattr(value, "bit_generator"):
            state = _plain(value.bit_generator.state)
            out[key] = {_GENERATOR: "numpy.Generator", "state": state}
        else:
            out[key] = value
    return out


def _restored_extras(loaded: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """Loaded extras, with generator states put back into the objects ``current`` holds
    under the same keys (so references the loop keeps stay valid), or into new ones."""
    out = dict(loaded)
    for key, value in loaded.items():
        if not isinstance(value, dict) or _GENERATOR not in value:
            continue
        kind, state = value[_GENERATOR], value["state"]
        if kind == "random.Random":
            gen = current.get(key)
            gen = gen if isinstance(gen, random.Random) else random.Random()
            version, internal, gauss = state
            gen.setstate((int(version), tuple(int(x) for x in internal), gauss))
        else:
            import numpy as np

            gen = current.get(key)
            if not isinstance(gen, np.random.Generator):
                gen = np.random.Generator(getattr(np.random, state["bit_generator"])())
            gen.bit_generator.state = _plain(state)
        out[key] = gen
    return out


def _plain(value: Any) -> Any:
    """A generator's state in plain Python values (ints, lists, dicts), which save and
    load back without unpickling NumPy objects; NumPy's setters accept them."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # NumPy arrays and scalars, tensors
        return value.tolist()
    return value


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rng_state() -> dict[str, Any]:
    """This process's generators, as values ``torch.load(weights_only=True)`` accepts."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured; parts this machine lacks are skipped."""
    if "python" in state and state["python"] is not None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if isinstance(state.get("torch"), torch.Tensor):
        torch.set_rng_state(state["torch"].cpu())
    np_state = state.get("numpy")
    if isinstance(np_state, dict):
        try:
            import numpy as np

            np.random.set_state(
                (
                    np_state["name"],
                    np_state["keys"].numpy().astype(np.uint32),
                    int(np_state["pos"]),
                    int(np_state["has_gauss"]),
                    float(np_state["cached_gaussian"]),
                )
            )
        except ImportError:
            log.warning(
                "the checkpoint has a NumPy generator state but NumPy is not installed; skipped"
            )
    cuda = state.get("cuda")
    if cuda:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        restore, problem = cuda_rng_plan(len(cuda), have)
        for index in range(restore):
            torch.cuda.set_rng_state(cuda[index].cpu(), device=index)
        if problem:
            log.warning("%s", problem)


def cuda_rng_plan(saved: int, have: int) -> tuple[int, str | None]:
    """How many CUDA generator states to restore (devices 0..n-1) when the checkpoint
    has ``saved`` and this process sees ``have`` devices, and what to warn about."""
    restore = min(saved, have)
    if saved == have:
        return restore, None
    if have == 0:
        return 0, (
            f"the checkpoint has CUDA generator states for {saved} device(s) but this machine "
            "has no GPU: not restored"
        )
    what = f"the checkpoint has CUDA generator states for {saved} device(s), this process sees {have}: "
    what += f"restored device(s) 0-{restore - 1}; "
    if saved > have:
        return restore, what + f"the saved states of device(s) {have}-{saved - 1} are not used"
    return restore, what + (
        f"device(s) {saved}-{have - 1} keep their current state, so random numbers drawn there "
        "will not repeat the saved run"
    )


def seed_new_rank(rank0: dict[str, Any], rank: int) -> None:
    """Generators for a rank the saved run did not have (resuming on more ranks): seeded
    from rank 0's saved torch generator state and ``rank``, the same on every resume
    and different per rank. Python's, NumPy's, torch's and every CUDA device's."""
    base = rank0.get("torch")
    data = base.numpy().tobytes() if isinstance(base, torch.Tensor) else b""
    seed = xxhash.xxh3_64_intdigest(data + rank.to_bytes(8, "little"))
    random.seed(seed)
    torch.manual_seed(seed)  # also every CUDA device's
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def _under(part: str) -> Callable[[tuple[Any, ...]], bool]:
    return lambda path: bool(path) and path[0] == part


def _paths(metadata: Any) -> list[tuple[Any, ...]]:
    planner_data = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    out: list[tuple[Any, ...]] = []
    for fqn in metadata.state_dict_metadata:
        path = planner_data.get(fqn)
        out.append(path if isinstance(path, tuple) and path else tuple(fqn.split(".")))
    return out
