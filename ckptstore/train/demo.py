"""The README's main job: a training run that is interrupted and resumed, as a user sees it.

    python -m ckptstore.train.demo [--dir runs/demo] [--steps 400] [--interrupt-at 250]
        [any other python -m ckptstore.train flags]

It runs the reference training loop (:mod:`ckptstore.train`, the "small" GPT on
Python's own help text, asynchronous saves every 50 steps) in a child process, sends it
Ctrl+C (SIGINT) once it has done ``--interrupt-at`` steps, and then runs the very same
command again, which resumes from the checkpoint the interruption saved and finishes
the run. Everything the two processes print is shown as it comes.

A fresh ``--dir`` is used unless you pass one, so that the demo starts from scratch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

from ckptstore.train.parsing import OneLineErrors


def main(argv: list[str] | None = None) -> int:
    ap = OneLineErrors(
        prog="python -m ckptstore.train.demo",
        description=__doc__.split("\n")[0]
        + " Other options go to the training run (python -m ckptstore.train --help).",
    )
    ap.add_argument("--dir", default=None, help="checkpoint directory (default: a fresh one)")
    ap.add_argument("--steps", type=int, default=400, help="steps in all (default 400)")
    ap.add_argument(
        "--interrupt-at", type=int, default=250, help="the step to press Ctrl+C after (default 250)"
    )
    args, train_args = ap.parse_known_args(argv)
    if not 0 < args.interrupt_at < args.steps:
        ap.error("--interrupt-at must be between 0 and --steps")
    ckpt_dir = args.dir or os.path.join(tempfile.mkdtemp(prefix="ckptstore-demo-"), "ckpts")
    cmd = [
        sys.executable, "-m", "ckptstore.train",
        "--steps", str(args.steps), "--save-every", "50", "--log-every", "10",
        "--ckpt-dir", ckpt_dir, *train_args,
    ]  # fmt: skip
    shown = " ".join(["python", *cmd[1:]])

    print(
        f"\n### 1. Train, and press Ctrl+C after step {args.interrupt_at}:\n$ {shown}\n", flush=True
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    interrupted = False
    with proc.stdout:
        for line in proc.stdout:
            print(line, end="", flush=True)
            if not interrupted and line.startswith("step ") and _step(line) >= args.interrupt_at:
                print("^C  (the demo sends SIGINT, as Ctrl+C would)", flush=True)
                proc.send_signal(signal.SIGINT)
                interrupted = True
    code = proc.wait()
    if code == 0 and not interrupted:  # a --dir whose run had finished: resumed, done
        print(
            f"\nThe run in {ckpt_dir} had already done its {args.steps} steps: it resumed "
            "and had nothing left to train. Give a fresh --dir (or leave it out) to see the "
            "interruption and the resume, or more --steps to train this run on."
        )
        return 0
    if code != 128 + signal.SIGINT:
        print(f"\nthe training process exited with {code}, not 130 (interrupted): stopping")
        return 1

    print(f"\n### 2. Run the same command again: it resumes and finishes.\n$ {shown}\n", flush=True)
    code = subprocess.call(cmd)
    if code != 0:
        return code
    print(
        f"\nCheckpoints are in {ckpt_dir}. Resuming is bit-exact on CPU: "
        "tests/test_train.py compares an interrupted run with an uninterrupted one."
    )
    return 0


def _step(line: str) -> int:
    try:
        return int(line.split()[1].split("/")[0])
    except (IndexError, ValueError):
        return -1


if __name__ == "__main__":
    sys.exit(main())
