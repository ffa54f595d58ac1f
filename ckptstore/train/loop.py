"""The reference training loop: a GPT-style run on CUDA or CPU, one process or torchrun.

    python -m ckptstore.train [--size small] [--steps 300 | --epochs E] [--ckpt-dir DIR]
        [--save-every 50] [--save-every-s S] [--keep-last N] [--keep-every-epoch]
        [--keep-best N] [--no-checkpoint] [--resume latest|best|STEP|PATH|none]
        [--backup s3://bucket/prefix] [--codec auto] [--data FILE] [--device auto]
    torchrun --nproc_per_node=2 -m ckptstore.train ...     # FSDP2, gloo on CPU / NCCL on CUDA

It drives :class:`~ckptstore.CheckpointManager` the way a user's loop would: restore at
start (the latest checkpoint by default), ``maybe_save`` after every step, ``guard`` for
Ctrl+C, SIGTERM and errors. Data is byte-level text: by default the topic help that
ships with every Python (``pydoc_data``), split 90/10 into train and validation, or
``--data FILE``. ``--steps`` and ``--epochs`` are totals, so rerunning the same command
after an interruption finishes the same run; on CPU the resumed run is bit-identical to
an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

import ckptstore
from ckptstore.errors import EXIT_USAGE, CkptStoreError, CliError
from ckptstore.integrations.data import ResumableDataLoader
from ckptstore.manager.policies import AnyOf, KeepBest, KeepEvery, KeepLast, SaveEvery
from ckptstore.train import checks
from ckptstore.train.args import parse_args
from ckptstore.train.model import GPT, MODEL_SIZES
from ckptstore.train.report import (
    backup_summary,
    describe_keep,
    describe_policy,
    kept_summary,
    summary,
    write_report,
)

log = logging.getLogger("ckptstore.train")


# ---- data ---------------------------------------------------------------------------
def load_text(path: str | None) -> tuple[bytes, str]:
    """The corpus as bytes, and where it came from."""
    if path is None:
        import pydoc_data.topics as topics

        text = "\n".join(topics.topics[k] for k in sorted(topics.topics)).encode()
        return text, "pydoc_data.topics (Python's own help text)"
    return checks.read_data(path), path


class Windows(Dataset[torch.Tensor]):
    """Non-overlapping windows of ``block + 1`` tokens (input and shifted target)."""

    def __init__(self, tokens: torch.Tensor, block: int) -> None:
        self.tokens = tokens
        self.block = block
        self.n = (len(tokens) - 1) // block

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tokens[i * self.block : i * self.block + self.block + 1]


def split(data: bytes, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    cut = int(len(tokens) * 0.9)
    train, val = tokens[:cut], tokens[cut:]
    if len(train) < 2 * (block + 1) or len(val) < block + 1:
        raise CliError(
            f"the text has {len(tokens)} bytes: too short for a block size of {block} "
            "(choose a smaller --size or a longer --data file)",
            EXIT_USAGE,
        )
    return train, val


# ---- schedule -----------------------------------------------------------------------
def lr_lambda(warmup: int, total: int, floor: float = 0.1) -> Any:
    """Linear warmup, then cosine decay to ``floor`` of the peak."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# ---- the run ------------------------------------------------------------------------
@dataclass
class Run:
    args: argparse.Namespace
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    saves: list[dict[str, Any]] = field(default_factory=list)
    losses: dict[int, float] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)

    def say(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)


def pick_device(arg: str, local_rank: int) -> torch.device:
    if arg == "auto":
        arg = "cuda" if torch.cuda.is_available() else "cpu"
    if arg.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CliError(
                f"--device {arg}: no CUDA device is available (use --device cpu)", EXIT_USAGE
            )
        if arg == "cuda":
            arg = f"cuda:{local_rank % torch.cuda.device_count()}"
        torch.cuda.set_device(torch.device(arg))
    return torch.device(arg)


def setup_distributed(run: Run) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    run.device = pick_device(run.args.device, local_rank)
    if world > 1:
        backend = "nccl" if run.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=run.device if backend == "nccl" else None)
        run.rank, run.world = dist.get_rank(), dist.get_world_size()
        if local_rank == 0 and run.rank != 0:  # another node: a line, not silence
            node = os.environ.get("GROUP_RANK", "?")
            last = run.rank + int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1
            ranks = f"rank {run.rank}" if last == run.rank else f"ranks {run.rank}-{last}"
            print(
                f"ckptstore train: node {node}, {ranks} of {run.world}, "
                f"checkpoints in {run.args.ckpt_dir}; rank 0's node prints the run's progress, "
                "this node its own errors",
                flush=True,
            )


def build(run: Run, cfg: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    # Every generator a run draws from starts from --seed (a resume restores them all).
    random.seed(run.args.seed)
    np.random.seed(run.args.seed)
    torch.manual_seed(run.args.seed)
    model: torch.nn.Module = GPT(cfg).to(run.device)
    if run.args.freeze_blocks:  # fine-tuning: the optimizer keeps no state for these
        model.blocks.requires_grad_(False)
    if run.world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(run.device.type, (run.world,))
        for block in model.blocks:  # type: ignore[union-attr]
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=run.args.lr,
        betas=(0.9, 0.95),
    )
    return model, opt


def trainable(model: torch.nn.Module) -> int:
    """Parameters that train (a tied one counted once; a sharded one whole)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def policies(args: argparse.Namespace) -> tuple[Any, Any]:
    save: list[Any] = []
    if args.save_every:
        save.append(SaveEvery(steps=args.save_every))
    if args.save_every_s:
        save.append(SaveEvery(seconds=args.save_every_s))
    if args.keep_every_epoch:
        save.append(SaveEvery(epochs=1))  # so that there is an end-of-epoch save to keep
    keep: list[Any] = []
    if args.keep_last:
        keep.append(KeepLast(args.keep_last))
    if args.keep_every_epoch:
        keep.append(KeepEvery(epochs=1))
    if args.keep_best:
        keep.append(KeepBest(args.keep_best, metric="val_loss", mode="min"))
    save_policy = None if not save else save[0] if len(save) == 1 else AnyOf(*save)
    keep_policy = None if not keep else keep[0] if len(keep) == 1 else AnyOf(*keep)
    return save_policy, keep_policy


@torch.no_grad()
def evaluate(run: Run, model: torch.nn.Module, val: torch.Tensor, block: int) -> float:
    """Mean loss on fixed validation windows; draws no random numbers."""
    model.eval()
    n = len(val) - block - 1
    total = 0.0
    count = 0
    stride = max(1, n // (run.args.eval_batches * run.args.batch_size))
    starts = list(range(0, n, stride))[: run.args.eval_batches * run.args.batch_size]
    for i in range(0, len(starts), run.args.batch_size):
        idx = starts[i : i + run.args.batch_size]
        x = torch.stack([val[j : j + block] for j in idx]).to(run.device)
        y = torch.stack([val[j + 1 : j + 1 + block] for j in idx]).to(run.device)
        with autocast(run):
            _, loss = model(x, y)
        total += float(loss) * len(idx)
        count += len(idx)
    model.train()
    return total / max(1, count)


def autocast(run: Run) -> Any:
    if run.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for chatty in ("botocore", "aiobotocore", "s3fs", "fsspec"):  # "Found credentials ..."
        logging.getLogger(chatty).setLevel(logging.WARNING)
    run = Run(args)
    try:
        setup_distributed(run)
    except CliError as exc:  # (--device cuda without one)
        print(f"ckptstore train: error: {exc}", file=sys.stderr, flush=True)
        return exc.code
    if run.rank != 0:
        logging.getLogger("ckptstore").setLevel(logging.WARNING)
    try:
        return _train(run)
    except (CkptStoreError, OSError) as exc:  # expected: one line that says what to do
        message, code = checks.explain(exc, args)
        where = f"[rank {run.rank}] " if run.world > 1 else ""
        print(f"ckptstore train: error: {where}{message}", file=sys.stderr, flush=True)
        return code
    finally:
        if run.world > 1 and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.barrier()
            dist.destroy_process_group()


def set_threads(run: Run) -> None:
    """On the CPU, unless OMP_NUM_THREADS says otherwise: each process's compute threads
    are its share of the cores, less one left to the background writer (on 2 cores with
    torch's default of 2 threads, training and the writer took turns on the same cores:
    the demo took 3x as long)."""
    if run.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(1, run.world) - 1))


def _train(run: Run) -> int:
    args = run.args
    if run.world > 1:  # (before anything else that is collective)
        checks.same_flags_on_every_rank(args, run.world)
    cfg = MODEL_SIZES[args.size]
    text, source = load_text(args.data)
    train_tokens, val_tokens = split(text, cfg.block_size)
    set_threads(run)
    if not args.no_checkpoint:  # fail now, not at the first save
        checks.check_writable(args.ckpt_dir, "--ckpt-dir")
    if args.backup:  # a missing bucket or credentials fail before training
        checks.check_writable(args.backup, "--backup")
    dataset = Windows(train_tokens, cfg.block_size)
    loader = ResumableDataLoader(
        dataset, batch_size=args.batch_size, seed=args.seed, drop_last=True
    )
    per_epoch = loader.batches_per_epoch()
    if per_epoch < 1:
        raise CliError(
            "the training text is shorter than one batch: lower --batch-size", EXIT_USAGE
        )
    total = args.epochs * per_epoch if args.epochs is not None else (args.steps or 300)
    model, opt = build(run, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup, total))
    state = ckptstore.TrainState(
        model=model, optimizer=opt, scheduler=sched, dataloader=loader, extras={"tokens": 0}
    )
    save_policy, keep_policy = policies(args)
    mgr = ckptstore.CheckpointManager(
        args.ckpt_dir,
        save=save_policy,
        keep=keep_policy,
        enabled=not args.no_checkpoint,
        best_metric="val_loss",
        backup=args.backup,
        codec=args.codec,
        incremental=args.incremental,
        trust_version_counters=args.trust_version_counters,
        **({} if args.full_every is None else {"full_every": args.full_every}),
    )
    try:
        return _loop(run, mgr, state, cfg, source, train_tokens, val_tokens, total)
    except SystemExit as exc:
        if exc.code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            run.say(f"interrupted after step {state.step}: saved; rerun the same command to resume")
            if args.report:
                write_report(run, state, model, mgr, interrupted=True)
        raise
    finally:
        mgr.close()


def _loop(
    run: Run,
    mgr: ckptstore.CheckpointManager,
    state: ckptstore.TrainState,
    cfg: Any,
    source: str,
    train_tokens: torch.Tensor,
    val_tokens: torch.Tensor,
    total: int,
) -> int:
    args = run.args
    model, opt, sched, loader = state.model, state.optimizer, state.scheduler, state.dataloader
    assert model is not None
    assert opt is not None
    assert sched is not None
    assert loader is not None
    run.say("=" * 72)
    run.say(
        f"Device:           {run.device} x {run.world} process(es)"
        f"{' (FSDP2)' if run.world > 1 else ''}, {torch.get_num_threads()} compute thread(s) each"
    )
    run.say(
        f"Model:            GPT {args.size}: {cfg.n_layer} layers, {cfg.n_embd} wide, "
        f"{cfg.num_params() / 1e6:.2f} M parameters"
        + (
            f" ({trainable(model) / 1e6:.2f} M train: --freeze-blocks)"
            if args.freeze_blocks
            else ""
        )
    )
    run.say(
        f"Data:             {source}: {len(train_tokens):,} train / "
        f"{len(val_tokens):,} validation bytes, {loader.batches_per_epoch()} steps per epoch"
    )
    run.say(
        f"Training:         {total} steps in all, batch {args.batch_size} x "
        f"{cfg.block_size} tokens per process"
    )
    run.say(
        f"Checkpoints:      {args.ckpt_dir}"
        + (f", backed up to {args.backup}" if args.backup else "")
    )
    run.say(
        f"Save checkpoints: {'disabled' if args.no_checkpoint else 'enabled'}"
        + ("" if args.no_checkpoint else f" ({describe_policy(args)}, codec {args.codec})")
    )
    with checks.noting_failures() as noted:
        try:
            newer = "discard" if args.discard_newer else "refuse"
            start = mgr.restore(state, args.resume, newer=newer)
        except (CkptStoreError, ValueError) as exc:
            raise checks.resume_error(args.resume, args.ckpt_dir, exc, noted) from None
    if args.resume in ("none", None):
        run.say("Resume:           no (--resume none): starting from scratch")
    elif mgr.restored is not None:  # (an imported checkpoint may be step 0)
        run.say(
            f"Resume:           from step {start} (epoch {loader.epoch}, "
            f"{loader.batches_taken} batches into it)"
        )
    else:
        run.say("Resume:           nothing to resume: starting from scratch")
    doomed = mgr.retention_preview() if run.rank == 0 else []
    if doomed:  # (an earlier run kept them under looser flags: say so before they go)
        shown = ", ".join(doomed[:3]) + (f" ... {doomed[-1]}" if len(doomed) > 3 else "")
        run.say(
            f"Retention:        keep {describe_keep(args)} will delete checkpoints already "
            f"in {args.ckpt_dir} once this run saves: {len(doomed)} now ({shown}), more as "
            "newer ones come; to keep them, stop now (Ctrl+C) and rerun with the "
            "--keep-last they were kept with (0 keeps all)"
        )
    run.say("=" * 72)

    step = start
    t_start = time.perf_counter()
    blocked = 0.0
    tokens_per_step = args.batch_size * cfg.block_size * run.world
    steps_run = 0
    last_val: float | None = None
    window_t = time.perf_counter()
    window_loss = 0.0
    window_n = 0
    step_times: list[float] = []
    t_step = time.perf_counter()
    model.train()
    with mgr.guard(state):
        while step < total:
            epoch = loader.epoch
            for batch in loader:
                x = batch[:, :-1].to(run.device, non_blocking=True)
                y = batch[:, 1:].to(run.device, non_blocking=True)
                with autocast(run):
                    _, loss = model(x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if args.clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                opt.step()
                sched.step()
                loss_value = float(loss.detach())
                run.losses[step] = loss_value
                state.extras["tokens"] += tokens_per_step
                window_loss += loss_value
                window_n += 1
                end = loader.batches_taken == loader.batches_per_epoch()
                metrics = None
                if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == total):
                    last_val = evaluate(run, model, val_tokens, cfg.block_size)
                    metrics = {"val_loss": last_val}
                t0 = time.perf_counter()
                pending = mgr.maybe_save(
                    step, state, epoch=epoch, end_of_epoch=end, metrics=metrics
                )
                t1 = time.perf_counter()
                blocked += t1 - t0
                step_times.append(t1 - t_step)
                t_step = t1
                if pending is not None:
                    run.saves.append({"step": step + 1})
                steps_run += 1
                step += 1
                if run.rank == 0 and (step % args.log_every == 0 or step == total):
                    now = time.perf_counter()
                    rate = window_n * tokens_per_step / max(now - window_t, 1e-9)
                    val = f" | val {last_val:.3f}" if last_val is not None else ""
                    print(
                        f"step {step:>6}/{total} | loss {window_loss / window_n:.3f}{val} | "
                        f"lr {sched.get_last_lr()[0]:.2e} | {rate:,.0f} tok/s",
                        flush=True,
                    )
                    window_t, window_loss, window_n = now, 0.0, 0
                if args.stop_after is not None and step == args.stop_after:
                    os.kill(os.getpid(), signal.SIGTERM)  # tests: a signal at a known step
                if step >= total:
                    break
    elapsed = time.perf_counter() - t_start
    blocked += state.copy_wait_s  # optimizer.step() waiting for a background copy
    run.timing = {
        "elapsed_s": elapsed,
        "blocked_s": blocked,
        "steps_run": steps_run,
        "tokens_per_s": steps_run * tokens_per_step / max(elapsed, 1e-9),
        "step_times_s": step_times,
    }
    mgr.wait()
    summary(run, mgr, state, steps_run, elapsed, blocked, tokens_per_step, total)
    if args.report:
        write_report(run, state, model, mgr, interrupted=False)
    mgr.close()  # waits for the backup's uploads (and the retention after them)
    return backup_summary(run, mgr, kept_summary(run, mgr))


def main(argv: list[str] | None = None) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return train(argv)
    # Under torchrun: torch 2.13's gloo can abort a process at interpreter exit after
    # DeviceMesh collectives ("terminate called without an active exception"), turning
    # a finished run into a failure. The process group is already destroyed by now.
    try:
        code = train(argv)
    except SystemExit as exc:
        if not isinstance(exc.code, int):
            raise
        code = exc.code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
