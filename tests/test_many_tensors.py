"""Many small tensors: the shard writer encodes small items in batches and the reader
runs chunk jobs in batches; the file format stays the same and round trips are exact."""

from __future__ import annotations

import collections
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from helpers import assert_same, blank_like

import ckptstore
from ckptstore.errors import CorruptCheckpointError
from ckptstore.format.shard import run_all
from ckptstore.layout import checkpoint_name


def many(n: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.float64]
    model = {}
    for i in range(n):
        size = int(torch.randint(0, 300, (1,), generator=g))
        model[f"p{i}"] = torch.randn(size, generator=g).to(dtypes[i % len(dtypes)])
    model["big"] = torch.randn(300_000, generator=g)  # between the small ones
    model["zero"] = torch.empty(0)
    return {"model": model, "tail": [torch.ones(3), 7], "note": "x"}


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_many_small_tensors_round_trip_bit_exact(root, codec):
    state = many(2000)
    with ckptstore.Checkpointer(root, codec=codec, chunk_bytes=64 * 1024) as ckpt:
        ckpt.save(state, 1)
        ckpt.save(state, 2)
        target = blank_like(state)
        ckpt.load(target, 2)
    assert_same(state, target)
    target = blank_like(state)
    ckptstore.load(target, f"{root}/{ckptstore.layout.checkpoint_name(1)}")
    assert_same(state, target)


def test_run_all_in_batches_runs_every_job_and_raises_the_first_failure():
    done = []
    lock = threading.Lock()

    def job(i: int) -> None:
        with lock:
            done.append(i)
        if i in (700, 900):
            raise ValueError(f"job {i}")

    jobs = [lambda i=i: job(i) for i in range(2000)]
    with ThreadPoolExecutor(4) as pool, pytest.raises(ValueError, match="job 700"):
        run_all(jobs, pool)
    assert sorted(done) == list(range(2000))


def test_uncompressed_items_below_a_mebibyte_share_pool_tasks(root, monkeypatch):
    """Codec none: an item's encoding is its checksum, so items of 64 KiB to 1 MiB are
    batched like small ones (a pool task each cost more than their hash), each still
    its own chunk; the file reads back bit-exact."""
    import ckptstore.format.shard as shard_mod

    tasks = []
    real = shard_mod._encode_all

    def counted(codec: Any, pieces: Any) -> Any:
        tasks.append(len(pieces))
        return real(codec, pieces)

    monkeypatch.setattr(shard_mod, "_encode_all", counted)
    g = torch.Generator().manual_seed(3)
    state = {f"w{i}": torch.randn(50_000, generator=g) for i in range(40)}  # 200 KB each
    with ckptstore.Checkpointer(root, codec="none") as ckpt:
        ckpt.save(state, 1)
        target = blank_like(state)
        ckpt.load(target, 1)
    assert_same(state, target)
    assert sum(tasks) == 40 and len(tasks) <= 3, tasks  # 8 MB in batches of ~4 MiB


@pytest.fixture
def counted_parses(monkeypatch):
    """Each index parse, by the index's size in bytes, with nothing kept beforehand."""
    import ckptstore.format.shard_index as index_mod

    calls: list[int] = []
    real = index_mod.parse_index

    def counted(data: bytes, limit: int) -> Any:
        calls.append(len(data))
        return real(data, limit)

    monkeypatch.setattr(index_mod, "parse_index", counted)
    monkeypatch.setattr(index_mod, "_kept", collections.OrderedDict())
    monkeypatch.setattr(index_mod, "_kept_bytes", 0)
    return calls


def test_a_shard_index_read_again_is_not_parsed_again(root, counted_parses):
    """An incremental save reads the index of each file it links from every save: a
    file whose index (by checksum) was parsed before is not parsed again; one damaged
    since is still refused."""
    state = many(300)
    with ckptstore.Checkpointer(root, codec="none") as ckpt:
        ckpt.save(state, 1)
        for _ in range(3):
            target = blank_like(state)
            ckpt.load(target, 1)
            assert_same(state, target)
        assert len(counted_parses) == 1, counted_parses  # one shard file, parsed once
        shard = os.path.join(root, checkpoint_name(1), "__0_0.distcp")
        with open(shard, "r+b") as f:
            f.seek(-20, os.SEEK_END)  # in the index
            byte = f.read(1)
            f.seek(-20, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(CorruptCheckpointError, match="index checksum mismatch"):
            ckpt.load(blank_like(state), 1)


def test_parsed_indexes_are_kept_up_to_a_bound(root, counted_parses, monkeypatch):
    import ckptstore.format.shard_index as index_mod

    monkeypatch.setattr(index_mod, "_KEEP_BYTES", 10_000)  # one of these indexes, not two
    with ckptstore.Checkpointer(root, codec="none") as ckpt:
        ckpt.save(many(50), 1)
        ckpt.save(many(60), 2)
        for step in (1, 2, 2, 1):  # parsed, parsed (1 let go), kept, parsed again
            ckpt.load(blank_like(many(50 if step == 1 else 60)), step)
    first, second, again = counted_parses
    assert max(first, second) <= 10_000 < first + second
    assert again == first
    assert len(index_mod._kept) == 1 and index_mod._kept_bytes == first


def test_kept_indexes_share_one_codec_per_config(root, counted_parses):
    """A codec keeps scratch per thread that decodes with it (zstd: a chunk's worth);
    the indexes kept share one codec per config, not one each (~6 MiB per thread per
    file loaded, held as long as the index was kept)."""
    import ckptstore.format.shard_index as index_mod

    with ckptstore.Checkpointer(root, codec="zstd") as ckpt:
        for step in (1, 2, 3):
            state = many(20 + step)  # a different index each
            ckpt.save(state, step)
            ckpt.load(blank_like(state), step)
    assert len(counted_parses) == 3
    codecs = {id(item.codec) for items in index_mod._kept.values() for item in items}
    assert len(codecs) == len(
        {repr(item.codec.get_config()) for items in index_mod._kept.values() for item in items}
    )
