"""The benchmark suite behind ``ckptstore bench`` (see :mod:`ckptstore.bench.suite`).

suite: its options and the order of a run; workload: the state saved; contenders: who
saves it; compare: the interleaved comparison; ranks: the rank scaling (one process
per rank); codecs: the codec study; report: the markdown table and what a run records;
plots: the PNGs; common: timing, memory, machine info, shared with ``benchmarks/``.
"""
