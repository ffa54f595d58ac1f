"""Codec study: ratio and throughput per data class (``ckptstore.bench.codecs``).

    python benchmarks/bench_codecs.py [--threads 2] [--gpt-size medium] [--gpt-steps 30]

The same study runs as ``ckptstore bench --codecs``.
"""

import sys

from ckptstore.bench.codecs import main

if __name__ == "__main__":
    sys.exit(main())
