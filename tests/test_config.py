"""One frozen config per layer, passed whole or built from keywords, validated once."""

from __future__ import annotations

import dataclasses
import os
import sys
import threading

import pytest
import torch

import ckptstore
from ckptstore import config
from ckptstore.config import MANIFEST_KEY_ENV


def state() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}


def test_checkpointer_takes_a_config_whole(tmp_path):
    cfg = ckptstore.CheckpointerConfig(codec="zstd", threads=1)
    with ckptstore.Checkpointer(tmp_path / "r", config=cfg) as ckpt:
        assert ckpt.config is cfg
        result = ckpt.save(state(), 1)
        assert result.codec == "zstd"
        target = {"w": torch.zeros(3, 4)}
        ckpt.load(target)
    assert torch.equal(target["w"], state()["w"])


def test_config_and_keywords_together_are_refused(tmp_path):
    with pytest.raises(TypeError, match="config= or keyword"):
        ckptstore.Checkpointer(tmp_path, config=ckptstore.CheckpointerConfig(), codec="none")
    with pytest.raises(TypeError, match="config=ManagerConfig"):
        ckptstore.CheckpointManager(tmp_path, config=ckptstore.ManagerConfig(), codec="none")


def test_configs_are_frozen_and_validated_when_made():
    cfg = ckptstore.CheckpointerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.codec = "zstd"  # type: ignore[misc]
    with pytest.raises(ValueError, match="unknown codec"):
        ckptstore.CheckpointerConfig(codec="lz4")
    with pytest.raises(TypeError, match="SaveEvery"):
        ckptstore.ManagerConfig(save=ckptstore.KeepLast(2))
    with pytest.raises(ValueError, match="best_mode"):
        ckptstore.ManagerConfig(best_mode="lowest")
    with pytest.raises(ValueError, match="url="):
        ckptstore.BackupConfig(url="")
    with pytest.raises(ValueError, match="max_queued"):
        ckptstore.BackupConfig(url="s3://b/p", max_queued=0)


def test_threads_default_leaves_torchs_intra_op_threads_their_cores(monkeypatch):
    monkeypatch.setattr(config, "default_threads", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 6)
    assert ckptstore.CheckpointerConfig().resolved_threads == 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert ckptstore.CheckpointerConfig().resolved_threads == 1  # never 0
    assert ckptstore.CheckpointerConfig(threads=3).resolved_threads == 3


@pytest.mark.parametrize("nice", [-1, 20, 1.5, True, "5"])
def test_worker_nice_is_checked(nice):
    with pytest.raises(ValueError, match="worker_nice must be an int from 0 to 19"):
        ckptstore.CheckpointerConfig(worker_nice=nice)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
@pytest.mark.parametrize("nice", [0, 7])
def test_codec_threads_run_at_a_lower_priority_the_writer_does_not(tmp_path, nice):
    def niceness(t: threading.Thread) -> int:
        assert t.native_id is not None
        return os.getpriority(os.PRIO_PROCESS, t.native_id)

    caller = niceness(threading.current_thread())
    with ckptstore.Checkpointer(tmp_path, codec="none", threads=2, worker_nice=nice) as ckpt:
        ckpt.save({"w": torch.randn(1 << 20)}, 1)  # starts the codec threads
        alive = {t.name: niceness(t) for t in threading.enumerate()}
    codec = {v for k, v in alive.items() if k.startswith("ckptstore-codec")}
    writer = {v for k, v in alive.items() if k.startswith("ckptstore-writer")}
    assert codec == {min(19, caller + nice)} and writer == {caller}
    assert niceness(threading.current_thread()) == caller


def test_the_manifest_key_comes_from_the_environment_once(monkeypatch):
    monkeypatch.setenv(MANIFEST_KEY_ENV, "from the environment")
    cfg = ckptstore.CheckpointerConfig()
    monkeypatch.delenv(MANIFEST_KEY_ENV)
    assert cfg.manifest_key == b"from the environment"  # resolved when made, not on use
    assert "environment" not in repr(cfg)


def test_manager_with_manager_and_backup_configs(tmp_path):
    cfg = ckptstore.ManagerConfig(
        save=ckptstore.SaveEvery(steps=2),
        keep=ckptstore.KeepLast(1),
        checkpointer=ckptstore.CheckpointerConfig(codec="none", threads=1),
    )
    backup = ckptstore.BackupConfig(
        url=str(tmp_path / "remote"), keep=ckptstore.KeepLast(2), max_queued=3
    )  # none skipped: the remote keeps 4 and 6 however fast the saves come
    sd = state()
    with ckptstore.CheckpointManager(tmp_path / "local", config=cfg, backup=backup) as mgr:
        assert mgr.config is cfg and mgr.backup_keep == ckptstore.KeepLast(2)
        for step in range(6):
            sd["w"] += 1
            mgr.maybe_save(step, sd)
        mgr.wait_backup()
        assert [c.step for c in mgr.list()] == [6]
    remote = ckptstore.Checkpointer(tmp_path / "remote")
    assert [i.step for i in remote.list()] == [4, 6]
    remote.close()


def test_backend_options_reach_the_backend(tmp_path):
    cfg = ckptstore.CheckpointerConfig(backend_options={"direct_io": False})
    with ckptstore.Checkpointer(tmp_path / "r", config=cfg) as ckpt:
        assert ckpt.backend.direct_io is False  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="bogus"):
        ckptstore.Checkpointer(tmp_path / "r", backend_options={"bogus": 1})


def test_s3_part_size_and_timeouts_through_the_configs(tmp_path, s3_server, s3_bucket):
    """Direct S3 roots (CheckpointerConfig) and the backup tier (BackupConfig) alike."""
    opts = s3_server.options()
    s3_options = {"part_bytes": 5 << 20, "parts_in_flight": 2, "read_timeout_s": 30}
    with ckptstore.Checkpointer(
        f"s3://{s3_bucket}/direct",
        config=ckptstore.CheckpointerConfig(backend_options=s3_options),
        storage_options=opts,
    ) as ckpt:
        assert ckpt.backend.part_bytes == 5 << 20  # type: ignore[attr-defined]
        ckpt.save(state(), 1)
    backup = ckptstore.BackupConfig(
        url=f"s3://{s3_bucket}/backup", storage_options=opts, backend_options=s3_options
    )
    with ckptstore.CheckpointManager(tmp_path / "local", backup=backup) as mgr:
        assert mgr.backup_config is backup
        assert mgr._remote.part_bytes == 5 << 20  # type: ignore[union-attr]
        mgr.save(0, state())
        assert mgr.wait_backup() == []
    remote = ckptstore.Checkpointer(f"s3://{s3_bucket}/backup", storage_options=opts)
    assert [i.step for i in remote.list()] == [1]
    remote.close()


def test_a_mistyped_keyword_is_said_in_the_callers_name_with_the_nearest(tmp_path):
    """A typo said "CheckpointerConfig.__init__() got an unexpected keyword argument
    'kep'": neither the class the user called nor what was meant."""
    import ckptstore

    with pytest.raises(
        TypeError, match=r"^CheckpointManager\(\) got .* 'kep' \(did you mean 'keep'\?\)$"
    ):
        ckptstore.CheckpointManager(tmp_path / "m", kep=3)
    with pytest.raises(
        TypeError, match=r"^Checkpointer\(\) got .* 'codc' \(did you mean 'codec'\?\)$"
    ):
        ckptstore.Checkpointer(tmp_path / "c", codc="none")
    with pytest.raises(TypeError, match=r"argument 'zzz'$"):
        ckptstore.CheckpointManager(tmp_path / "m", zzz=1)
