"""The benchmark suite behind ``ckptstore bench`` (see :mod:`ckptstore.bench.suite`)."""
