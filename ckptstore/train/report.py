"""What the training command prints and records about a run: the policy line of the
banner, the summary, the backup's state at the end, and the JSON report the tests read."""

from __future__ import annotations

import argparse
import hashlib
import json
from typing import TYPE_CHECKING

import torch

import ckptstore
from ckptstore.layout import checkpoint_name

if TYPE_CHECKING:
    from ckptstore.train.loop import Run

# Exit status of a run that finished and saved locally, but whose backup is behind.
EXIT_BACKUP_BEHIND = 3


def param_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter's full value, in order (gathered under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k]
        assert isinstance(t, torch.Tensor)
        h.update(k.encode())
        h.update(t.detach().float().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def describe_keep(args: argparse.Namespace) -> str:
    """What the retention flags keep: "last 3, best 1 by val loss"."""
    keep = [f"last {args.keep_last}"] if args.keep_last else ["all"]
    if args.keep_every_epoch:
        keep.append("each epoch")
    if args.keep_best:
        keep.append(f"best {args.keep_best} by val loss")
    return ", ".join(keep)


def describe_policy(args: argparse.Namespace) -> str:
    parts = []
    if args.save_every:
        parts.append(f"every {args.save_every} steps")
    if args.save_every_s:
        parts.append(f"every {args.save_every_s:g} s")
    parts.append("on exit and signals")
    done = ", ".join(parts) + "; keep " + describe_keep(args)
    if args.incremental:
        full = 10 if args.full_every is None else args.full_every
        how = {0: "never full", 1: "every save full (as without --incremental)"}
        done += "; incremental, " + how.get(full, f"full every {full} saves")
        done += ", trusting version counters" if args.trust_version_counters else ""
    return done


def summary(
    run: Run,
    mgr: ckptstore.CheckpointManager,
    state: ckptstore.TrainState,
    steps_run: int,
    elapsed: float,
    blocked: float,
    tokens_per_step: int,
    total: int,
) -> None:
    """Print the summary (rank 0); the checkpoints kept are said by :func:`kept_summary`
    once the manager is closed (retention still runs as the backup's uploads end)."""
    if run.rank != 0:
        return
    run.say("-" * 72)
    run.say(
        f"Done: {state.step} steps ({steps_run} in this run) in {elapsed:.1f} s, "
        f"{steps_run * tokens_per_step / max(elapsed, 1e-9):,.0f} tokens/s"
    )
    if steps_run == 0 and state.step > total:  # (--steps below where the run stands)
        end = "--epochs" if run.args.epochs is not None else "--steps"
        run.say(
            f"Nothing trained: the run resumed at step {state.step}, past where {end} ends "
            f"it (step {total}); give a larger {end} to train on"
        )
    share = 100.0 * blocked / elapsed if elapsed else 0.0
    run.say(f"Blocked on checkpoints: {blocked:.2f} s of {elapsed:.1f} s ({share:.1f}%)")


def kept_summary(run: Run, mgr: ckptstore.CheckpointManager) -> str | None:
    """After ``mgr.close()``: the checkpoints kept (rank 0); returns the newest one's
    name, for :func:`backup_summary`."""
    if run.rank != 0:
        return None
    kept = mgr.list()
    if kept:
        said = [f"{c.step}" + (f" [{' '.join(sorted(c.tags))}]" if c.tags else "") for c in kept]
        if len(said) > 12:  # (--keep-last 0 keeps them all: not hundreds on one line)
            # the first and last three, and any tagged one between (best, say)
            shown = {0, 1, 2, len(kept) - 3, len(kept) - 2, len(kept) - 1}
            shown |= {i for i, c in enumerate(kept) if c.tags}
            short: list[str] = []
            for i, text in enumerate(said):
                if i in shown:
                    short.append(text)
                elif i - 1 in shown:  # a run of hidden ones starts
                    n = next((j for j in range(i, len(said)) if j in shown), len(said)) - i
                    short.append(f"... ({n} more)")
            said = [*short[:-1], f"{short[-1]} ({len(kept)} in all; ckptstore ls lists them)"]
        run.say(f"Checkpoints kept in {args_dir(run)}: {', '.join(said)}")
    elif run.args.no_checkpoint:
        run.say("Checkpoints: none (--no-checkpoint)")
    return checkpoint_name(kept[-1].step) if kept else None


def backup_summary(run: Run, mgr: ckptstore.CheckpointManager, newest: str | None) -> int:
    """After ``mgr.close()`` (which waited for the uploads): say where the backup stands
    and return the exit status, :data:`EXIT_BACKUP_BEHIND` if it lacks the newest
    checkpoint (the remote went away during the run)."""
    status = mgr.backup_status()
    if run.rank != 0 or status is None:
        return 0
    skipped = f", skipped {', '.join(sorted(status.skipped))}" if status.skipped else ""
    if status.repaired:  # (an upload found a damaged file there: replaced from here)
        skipped += f", repaired {', '.join(status.repaired)} (a damaged file there)"
    if status.damaged:
        run.say(
            f"Backup {status.remote} holds damaged checkpoints it could not repair: "
            f"{', '.join(status.damaged)}; `ckptstore verify {status.remote}` names every "
            f"one, `ckptstore sync <intact source> {status.remote} --verify-existing "
            "--replace-damaged` repairs them"
        )
    waiting = status.in_progress or status.queued
    if not waiting and (newest is None or status.newest_backed_up == newest):
        run.say(f"Backup {status.remote}: newest {status.newest_backed_up or 'none'}{skipped}")
        return 0
    error = f" (last error: {status.last_error})" if status.last_error else ""
    ckpt = mgr.checkpointer
    sync = (
        ""  # (sync copies whole checkpoints; each node's disk holds a part)
        if ckpt is not None and ckpt.node_local
        else f", or run `ckptstore sync {run.args.ckpt_dir} {status.remote}`"
    )
    run.say(
        f"Backup {status.remote} is BEHIND: it has {status.newest_backed_up or 'nothing'}, "
        f"the newest checkpoint is {newest}{skipped}{error}. Checkpoints are safe locally; "
        f"rerun the same command once the remote answers (it uploads what is missing)"
        f"{sync}"
    )
    return EXIT_BACKUP_BEHIND


def args_dir(run: Run) -> str:
    return str(run.args.ckpt_dir)


def write_report(
    run: Run,
    state: ckptstore.TrainState,
    model: torch.nn.Module,
    mgr: ckptstore.CheckpointManager,
    *,
    interrupted: bool,
) -> None:
    digest = param_digest(model)  # a collective under FSDP2: every rank
    if run.rank != 0:
        return
    with open(run.args.report, "w") as f:
        json.dump(
            {
                "step": state.step,
                "interrupted": interrupted,
                "losses": {str(k): v for k, v in sorted(run.losses.items())},
                "param_digest": digest,
                "world_size": run.world,
                **run.timing,
            },
            f,
        )
