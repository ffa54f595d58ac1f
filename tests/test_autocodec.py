"""``codec="auto"``: compress only where that gets the checkpoint where it goes sooner.

Tables over the cost model (write speed, encode speed, ratio, and with a backup tier the
upload speed after the local write), then the manager's wiring: with ``backup=`` the
first saves are compressed, without it a local disk stays uncompressed.
"""

from __future__ import annotations

import pytest
import torch

from ckptstore import CheckpointManager, SaveEvery
from ckptstore.codecs.auto import AutoCodec

MB = 1e6


@pytest.mark.parametrize(
    ("local", "write", "ratio", "downstream", "measured_down", "want"),
    [
        (True, None, 0.85, False, None, "none"),  # a local disk, nothing measured yet
        (False, None, 0.85, False, None, "zstd"),  # object storage, nothing measured yet
        (True, 2000 * MB, 0.85, False, None, "none"),  # zstd (1.4 GB/s on 2 threads) is slower
        (True, 100 * MB, 0.85, False, None, "zstd"),  # a slow disk: fewer bytes to write
        (True, 100 * MB, 0.97, False, None, "none"),  # barely compressible: not worth it
        (True, 2000 * MB, 0.85, True, None, "zstd"),  # an upload of unknown speed follows
        (True, 2000 * MB, 0.85, True, 50 * MB, "zstd"),  # ... over a 50 MB/s link
        (True, 2000 * MB, 0.85, True, 5000 * MB, "none"),  # ... over a fast link
        (True, 2000 * MB, 0.97, True, 50 * MB, "none"),  # barely compressible
        (True, None, 0.85, True, 50 * MB, "zstd"),  # local speed not measured yet
    ],
)
def test_choice(local, write, ratio, downstream, measured_down, want):
    auto = AutoCodec(local=local, threads=2)
    auto.write_bps = write
    auto.ratio = ratio
    auto.downstream = downstream
    auto.downstream_bps = measured_down
    assert auto.choose().codec_id == want


def test_backup_makes_auto_compress_from_the_first_save(s3_server, s3_bucket, tmp_path):
    state = {"w": torch.randn(1 << 20)}
    with CheckpointManager(tmp_path / "plain", save=SaveEvery(steps=1)) as mgr:
        mgr.maybe_save(0, state)
        mgr.wait()
        assert mgr.checkpointer.list()[-1].manifest.codec["id"] == "none"
    with CheckpointManager(
        tmp_path / "backed", save=SaveEvery(steps=1), backup=f"s3://{s3_bucket}/b"
    ) as mgr:
        mgr.maybe_save(0, state)
        mgr.wait()
        assert mgr.checkpointer.list()[-1].manifest.codec["id"] == "zstd"
