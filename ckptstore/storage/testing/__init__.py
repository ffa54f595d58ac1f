"""Testing a storage backend: the contract suite and a fault-injecting wrapper.

* :class:`BackendContract`: the contract of ``ckptstore/storage/base.py`` as pytest
  tests (like zarr's ``StoreTests``). Every backend in ckptstore runs it
  (``tests/test_storage.py``); a new backend subclasses it and provides a ``backend``
  fixture::

      from ckptstore.storage.testing import BackendContract

      class TestMyBackend(BackendContract):
          @pytest.fixture
          def backend(self, tmp_path):
              return open_backend(f"myfs://{tmp_path}/root")

* :class:`FaultyBackend`: wraps any backend; fails chosen operations
  (:func:`fail_nth`, :func:`fail_once`, or any ``fault(op, name)`` function) and adds
  latency.

This package imports pytest; nothing in ckptstore imports it, so ``import ckptstore``
never does.
"""

from __future__ import annotations

from ckptstore.storage.testing.buffers import BUFFER_KINDS, as_kind, page_aligned, rand_bytes
from ckptstore.storage.testing.contract import (
    BAD_NAME,
    MANIFEST,
    SIZES,
    UNSAFE_NAMES,
    BackendContract,
    assert_not_a_checkpoint,
    commit_one,
    temp_entries,
    write_file,
)
from ckptstore.storage.testing.faulty import (
    WRITE_PATH_OPS,
    Fault,
    FaultyBackend,
    fail_nth,
    fail_once,
)

__all__ = [
    "BAD_NAME",
    "BUFFER_KINDS",
    "MANIFEST",
    "SIZES",
    "UNSAFE_NAMES",
    "WRITE_PATH_OPS",
    "BackendContract",
    "Fault",
    "FaultyBackend",
    "as_kind",
    "assert_not_a_checkpoint",
    "commit_one",
    "fail_nth",
    "fail_once",
    "page_aligned",
    "rand_bytes",
    "temp_entries",
    "write_file",
]
