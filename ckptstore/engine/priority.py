"""CPU priority of ckptstore's own threads, so that a training loop wins the CPU.

A background save's CPU-heavy threads (the codec pool: encoding, hashing) run at a
higher niceness than the threads that called ckptstore: when the cores are busy the
kernel gives the training loop's threads the CPU first, and the save takes what is
left, so it takes longer; on an idle machine nice changes nothing. On Linux, ``setpriority(PRIO_PROCESS, tid)`` applies to that one
thread; elsewhere it would renice the whole process, so there nothing is changed.
"""

from __future__ import annotations

import os
import sys
import threading

MAX_NICE = 19


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's niceness by ``nice`` (0: leave it). A
    ``ThreadPoolExecutor`` initializer: it runs once in each new worker thread.

    Never raises: a priority is a preference, and a save must not fail over one."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(MAX_NICE, current + nice))
    except OSError:  # a sandbox without setpriority: run at the caller's priority
        pass
