"""The benchmark scripts' shared pieces live in the package (``ckptstore.bench.common``),
so that ``ckptstore bench`` and these scripts measure the same way."""

from ckptstore.bench.common import (  # noqa: F401
    PeakRSS,
    cpu_seconds,
    du,
    evict,
    fsync_tree,
    gpt_adamw_state,
    gpt_config_for,
    interleaved,
    machine_info,
    measure,
    rm,
    state_bytes,
    summarize,
    text_batch,
    text_tokens,
    write_json,
)
