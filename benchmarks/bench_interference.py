"""How much CPU a background save takes from training (issue 15): now
``ckptstore bench --interference`` (ckptstore.bench.interference); this forwards to it.

    python benchmarks/bench_interference.py --interference-size 512MB --interference-rounds 3
"""

from __future__ import annotations

import sys

from ckptstore.bench.suite import main

if __name__ == "__main__":
    sys.exit(main(["--interference", *sys.argv[1:]]))
