"""Issue 16, nanoGPT-style scripts: ``examples/nanogpt_style.py`` has nanoGPT's shape
(batches from torch's global generator inside the loop, the next batch fetched before
the optimizer step, evaluation drawing from the same generator, a disabled GradScaler,
a seed offset per rank). SIGTERM + rerun ends bit-identical to an uninterrupted run, in
1 process and in 2 DDP processes under torchrun: the fetched batch rides in each rank's
own ``extras``."""

from __future__ import annotations

import pytest
from helpers import (
    assert_interrupted_run_resumes_identically,
    assert_two_process_run_resumes_in_one,
)


@pytest.mark.parametrize("procs", [1, 2])
def test_an_interrupted_nanogpt_style_run_resumes_bit_identical(tmp_path, procs):
    assert_interrupted_run_resumes_identically(
        tmp_path,
        "nanogpt_style.py",
        procs,
        ["--max-iters", "30", "--save-every", "5", "--eval-interval", "10"],
        dir_flag="--out-dir",
        out_flag="--final-out",
    )


def test_a_ddp_run_resumes_in_one_process(tmp_path):
    """2 DDP processes stopped by SIGTERM; the rerun in one process resumes from their
    checkpoint (rank 0's extras, rank 0's generators) and finishes."""
    assert_two_process_run_resumes_in_one(
        tmp_path,
        "nanogpt_style.py",
        ["--max-iters", "30", "--save-every", "5", "--eval-interval", "10"],
        dir_flag="--out-dir",
        out_flag="--final-out",
    )
