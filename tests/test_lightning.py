"""Lightning's Trainer saving and loading through CkptStoreCheckpointIO (real Lightning, CPU)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

L = pytest.importorskip("lightning")

import torch  # noqa: E402
from helpers import REPO, assert_same, script_ends_cleanly  # noqa: E402
from lightning_worker import Adapted, Tiny, loaders, trainer  # noqa: E402

import ckptstore  # noqa: E402
from ckptstore.cli.main import main as cli_main  # noqa: E402
from ckptstore.engine.ops import verify  # noqa: E402
from ckptstore.errors import BackgroundSaveError  # noqa: E402
from ckptstore.integrations.lightning import CkptStoreCheckpointIO, load_module  # noqa: E402
from ckptstore.layout import split_checkpoint_path  # noqa: E402
from ckptstore.storage import open_backend  # noqa: E402
from ckptstore.storage.local import LocalBackend  # noqa: E402

pytestmark = [
    # Lightning's own advice (few dataloader workers, a non-empty checkpoint directory, ...)
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def entries(dirpath: str) -> list[str]:
    return sorted(os.listdir(dirpath))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class SlowIO(CkptStoreCheckpointIO):
    """Writes slowly, so that saves queue up behind each other and removals behind them."""

    def _write(self, *args, **kwargs):
        time.sleep(0.05)
        return super()._write(*args, **kwargs)


@pytest.mark.parametrize("io_factory", [CkptStoreCheckpointIO, lambda: SlowIO(max_inflight=3)])
def test_top_k_and_last_leave_exactly_what_was_asked(tmp_path, io_factory):
    dirpath = str(tmp_path / "ckpts")
    L.seed_everything(0)
    t = trainer(dirpath, io=io_factory(), max_steps=20)
    t.fit(Tiny(), *loaders())
    callback = t.checkpoint_callback
    names = entries(dirpath)
    assert len(names) == 4, names  # three best and last, nothing beside them
    assert "last.ckpt" in names
    assert sorted(os.path.basename(p) for p in callback.best_k_models) == sorted(
        n for n in names if n != "last.ckpt"
    )
    last = ckptstore.read(os.path.join(dirpath, "last.ckpt"))
    assert last["global_step"] == 20
    for path in callback.best_k_models:
        assert ckptstore.read(path)["global_step"] in range(2, 21, 2)


def test_resume_from_last_equals_an_uninterrupted_run(tmp_path):
    L.seed_everything(0)
    whole = Tiny()
    trainer(str(tmp_path / "a"), max_epochs=4).fit(whole, *loaders())

    L.seed_everything(0)
    trainer(str(tmp_path / "b"), max_epochs=2).fit(Tiny(), *loaders())
    L.seed_everything(0)
    resumed = Tiny()
    t = trainer(str(tmp_path / "b"), max_epochs=4)
    t.fit(resumed, *loaders(), ckpt_path="last")
    assert t.global_step == 32
    assert same_weights(whole, resumed)
    assert t.optimizers[0].state_dict()["state"].keys() == {0, 1, 2, 3}
    assert len(entries(str(tmp_path / "b"))) == 4


def test_validate_and_load_module_from_a_checkpoint(tmp_path):
    dirpath = str(tmp_path / "ckpts")
    L.seed_everything(0)
    t = trainer(dirpath, max_steps=10)
    model = Tiny(hidden=6, lr=0.02)
    t.fit(model, *loaders())
    best = t.checkpoint_callback.best_model_path
    score = float(t.checkpoint_callback.best_model_score)

    [metrics] = trainer(dirpath).validate(Tiny(hidden=6), loaders()[1], ckpt_path=best)
    assert metrics["val_loss"] == pytest.approx(score, rel=1e-6)

    loaded = load_module(Tiny, os.path.join(dirpath, "last.ckpt"))
    assert dict(loaded.hparams) == {"hidden": 6, "lr": 0.02}
    assert same_weights(loaded, model)
    into = load_module(Tiny(hidden=6), os.path.join(dirpath, "last.ckpt"))
    assert same_weights(into, model)


def test_overwrite_swaps_so_last_is_always_a_complete_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "last.ckpt")
    io = CkptStoreCheckpointIO()
    io.save_checkpoint({"w": torch.zeros(3), "global_step": 1}, path)
    io.wait()
    staging = io.staging_bytes
    assert staging > 0

    seen = []
    real_delete = LocalBackend.delete

    def delete(self, name):  # whenever anything is deleted, last.ckpt is complete
        seen.append((name, ckptstore.read(path)["global_step"]))
        real_delete(self, name)

    monkeypatch.setattr(LocalBackend, "delete", delete)
    for step in (2, 3):
        io.save_checkpoint({"w": torch.full((3,), float(step)), "global_step": step}, path)
    io.wait()
    assert io.staging_bytes == staging  # the same buffers, reused
    # The new one was written beside, swapped in, and the old one (now beside) deleted.
    assert ("last.ckpt.replacing", 2) in seen and ("last.ckpt.replacing", 3) in seen
    assert all(name != "last.ckpt" for name, _ in seen)
    assert entries(str(tmp_path)) == ["last.ckpt"]
    assert io.load_checkpoint(path)["global_step"] == 3
    io.teardown()


def test_overwrite_without_swap_keeps_a_good_checkpoint_at_every_moment(tmp_path, monkeypatch):
    path = str(tmp_path / "last.ckpt")
    io = CkptStoreCheckpointIO()
    io.save_checkpoint({"w": torch.zeros(3), "global_step": 1}, path)
    io.wait()

    # An object store cannot swap; cut the replace short between its two steps there.
    def crash(self, name, new_name):
        raise OSError("power loss")

    seen = []
    real_delete = LocalBackend.delete

    def delete(self, name):
        if name == "last.ckpt":  # the old one goes only once the new one is complete
            seen.append(ckptstore.read(str(tmp_path / "last.ckpt.replacing"))["global_step"])
        real_delete(self, name)

    monkeypatch.setattr(LocalBackend, "swap", lambda self, a, b: False)
    monkeypatch.setattr(LocalBackend, "move_aside", crash)
    monkeypatch.setattr(LocalBackend, "delete", delete)
    io.save_checkpoint({"w": torch.ones(3), "global_step": 2}, path)
    with pytest.raises(BackgroundSaveError, match="power loss"):
        io.wait()
    assert seen == [2]
    monkeypatch.undo()
    assert entries(str(tmp_path)) == ["last.ckpt.replacing"]
    got = io.load_checkpoint(path)  # the complete new one, beside the name
    assert got["global_step"] == 2
    assert torch.equal(got["w"], torch.ones(3))

    io.save_checkpoint({"w": torch.full((3,), 3.0), "global_step": 3}, path)
    assert io.load_checkpoint(path)["global_step"] == 3
    assert entries(str(tmp_path)) == ["last.ckpt"]
    io.save_checkpoint({"w": torch.full((3,), 4.0), "global_step": 4}, path)
    io.remove_checkpoint(path)  # runs after the save queued before it
    io.teardown()
    assert entries(str(tmp_path)) == []


def test_checkpoint_dict_comes_back_as_saved(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    fresh = torch.optim.SGD(model.parameters(), lr=0.1)  # no state yet: {"state": {}}
    checkpoint = {
        "state_dict": model.state_dict(),
        "optimizer_states": [opt.state_dict(), fresh.state_dict()],
        "lr_schedulers": [],
        "hyper_parameters": {"lr": 0.1, "args": argparse.Namespace(depth=2)},
        "callbacks": {"EarlyStopping{'monitor': 'val_loss'}": {"wait_count": 0}, "Empty": {}},
        "nested": [{}, 5],
    }
    io = CkptStoreCheckpointIO(async_save=False)
    io.save_checkpoint(checkpoint, str(tmp_path / "c.ckpt"))
    got = io.load_checkpoint(str(tmp_path / "c.ckpt"), weights_only=True)
    io.teardown()
    assert got["optimizer_states"][0]["state"].keys() == {0, 1}
    assert got["optimizer_states"][1]["state"] == {}
    assert got["hyper_parameters"] == {"lr": 0.1, "args": {"depth": 2}}
    assert got["callbacks"]["Empty"] == {}
    assert got["nested"] == [{}, 5]
    assert got["lr_schedulers"] == []
    opt2 = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    opt2.load_state_dict(got["optimizer_states"][0])
    want = opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], want)


def test_resume_from_a_file_lightning_itself_wrote(tmp_path):
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    L.seed_everything(0)
    t = trainer(str(tmp_path / "torch"), io=TorchCheckpointIO(), max_steps=8)
    t.fit(Tiny(), *loaders())
    assert os.path.isfile(tmp_path / "torch" / "last.ckpt")
    resumed = trainer(str(tmp_path / "ours"), max_steps=12)
    resumed.fit(Tiny(), *loaders(), ckpt_path=str(tmp_path / "torch" / "last.ckpt"))
    assert resumed.global_step == 12
    assert ckptstore.read(tmp_path / "ours" / "last.ckpt")["global_step"] == 12


def test_first_save_under_a_directory_removes_dead_saves_there(tmp_path):
    dead = tmp_path / ".tmp-epoch=0-step=4.ckpt-0123456789ab"  # a killed run's save
    dead.mkdir()
    (dead / "__0_0.distcp").write_bytes(b"x" * 100)
    os.utime(dead, (time.time() - 3600, time.time() - 3600))
    io = CkptStoreCheckpointIO(async_save=False)
    io.save_checkpoint({"w": torch.ones(2)}, str(tmp_path / "last.ckpt"))
    io.teardown()
    assert entries(str(tmp_path)) == ["last.ckpt"]
    with pytest.raises(ckptstore.CheckpointNotFoundError):
        io.load_checkpoint(str(tmp_path / "nothing" / "here.ckpt"))
    assert not (tmp_path / "nothing").exists()  # reading creates nothing


def test_wrapping_in_async_checkpoint_io_is_called_out(tmp_path, caplog):
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    io = CkptStoreCheckpointIO()
    wrapped = AsyncCheckpointIO(io)
    with caplog.at_level("WARNING", logger="ckptstore"):
        wrapped.save_checkpoint({"w": torch.ones(2)}, str(tmp_path / "a.ckpt"))
        wrapped.teardown()
        io.teardown()
    assert "AsyncCheckpointIO" in caplog.text
    assert ckptstore.read(tmp_path / "a.ckpt")["w"].tolist() == [1.0, 1.0]


def disk_bytes(dirpath) -> int:
    """What the files under ``dirpath`` take, each hard-linked file counted once."""
    seen = {}
    for top, _, files in os.walk(dirpath):
        for f in files:
            st = os.stat(os.path.join(top, f))
            seen[st.st_ino] = st.st_size
    return sum(seen.values())


def problems(path) -> list[str]:
    """What ``ckptstore verify`` finds wrong with checkpoint ``path`` (every byte read)."""
    root, name = split_checkpoint_path(path)
    return verify(open_backend(root, create=False), name, None)


def trained(path) -> dict:
    """What training left in Lightning checkpoint ``path`` (callbacks' state names its
    directory)."""
    got = ckptstore.read(path)
    return {k: got[k] for k in ("state_dict", "optimizer_states", "global_step", "epoch")}


def linked_files(checkpoint) -> list[str]:
    return sorted(f for f in os.listdir(checkpoint) if f.startswith("__0_0-"))


def fit_adapted(dirpath, steps, top_k=2, resume=False, **io_options):
    L.seed_everything(0)
    io = CkptStoreCheckpointIO(codec="none", **io_options)
    t = trainer(dirpath, io=io, max_steps=steps, checkpoint={"save_top_k": top_k})
    t.fit(Adapted(), *loaders(), ckpt_path="last" if resume else None)
    return t


def test_incremental_saves_link_the_frozen_layer_and_every_checkpoint_stays_whole(tmp_path, capsys):
    plain, inc = str(tmp_path / "plain"), str(tmp_path / "inc")
    fit_adapted(plain, 12)
    fit_adapted(inc, 12, incremental=True)
    names = entries(inc)
    assert names == entries(plain) and len(names) == 3 and "last.ckpt" in names
    for name in names:  # what each holds: the same as without incremental saves
        assert_same(trained(os.path.join(inc, name)), trained(os.path.join(plain, name)))
        if name != "epoch=0-step=2.ckpt":  # the first save writes everything
            assert linked_files(os.path.join(inc, name)), name  # the frozen layer, linked
    # the frozen layer (1 MB of the ~1.05 MB state) lies on the disk about once
    assert disk_bytes(inc) < 0.5 * disk_bytes(plain), (disk_bytes(inc), disk_bytes(plain))
    for name in names:
        assert problems(os.path.join(inc, name)) == [], name
    # the command line takes the directory whole: ls says what each holds alone
    capsys.readouterr()
    assert cli_main(["verify", inc]) == 0
    assert "all 3 checkpoint(s) intact" in capsys.readouterr().out
    assert cli_main(["ls", inc]) == 0
    out = capsys.readouterr().out
    assert "3 committed checkpoint(s) (named otherwise than step_N" in out, out
    assert "on disk: incremental saves share files" in out and "its own)" in out, out
    assert cli_main(["ls", inc, "--json"]) == 0  # the manifest records Lightning's counters
    for c in json.loads(capsys.readouterr().out)["checkpoints"]:
        saved = ckptstore.read(os.path.join(inc, c["name"]))
        assert (c["step"], c["epoch"]) == (saved["global_step"], saved["epoch"]), c
    for name in names:  # each still loads with every other one deleted
        if name != "last.ckpt":
            shutil.rmtree(os.path.join(inc, name))
    assert_same(trained(os.path.join(inc, "last.ckpt")), trained(os.path.join(plain, "last.ckpt")))


def test_incremental_resume_links_from_the_checkpoint_loaded(tmp_path):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    fit_adapted(whole, 12, incremental=True)
    fit_adapted(split, 8, top_k=-1, incremental=True)
    t = fit_adapted(split, 12, top_k=-1, resume=True, incremental=True)
    assert t.global_step == 12
    # the first save after the restart links the frozen layer from last.ckpt (step 8)
    first, before = (
        os.path.join(split, "epoch=1-step=10.ckpt"),
        os.path.join(split, "epoch=0-step=8.ckpt"),
    )
    assert linked_files(first), os.listdir(first)
    for f in linked_files(first):  # the same file on the disk, not a copy
        assert os.stat(os.path.join(first, f)).st_ino == os.stat(os.path.join(before, f)).st_ino
    assert_same(
        trained(os.path.join(split, "last.ckpt")), trained(os.path.join(whole, "last.ckpt"))
    )


def test_incremental_replace_on_an_object_store_keeps_every_name_loadable(s3_server, s3_bucket):
    io = CkptStoreCheckpointIO(codec="none", incremental=True, async_save=False)
    frozen = torch.randn(256, 1024)  # 1 MB
    root = f"s3://{s3_bucket}/run"
    want = {}
    for step in range(1, 5):
        state = {"frozen": frozen, "adapter": torch.full((8,), float(step)), "global_step": step}
        for name in (f"step={step}.ckpt", "last.ckpt"):
            io.save_checkpoint(state, f"{root}/{name}")
            want[name] = {
                k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()
            }
        if step > 2:
            io.remove_checkpoint(f"{root}/step={step - 2}.ckpt")
    io.teardown()
    fs = s3_server.fs()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{s3_bucket}/run"))
    assert names == ["last.ckpt", "step=3.ckpt", "step=4.ckpt"]
    for name in names:
        got = io.load_checkpoint(f"{root}/{name}")
        assert_same({k: got[k] for k in want[name]}, want[name])
        assert problems(f"{root}/{name}") == []
    # copied inside the store from the save before, not written again
    linked = [p for p in fs.ls(f"{s3_bucket}/run/last.ckpt") if "__0_0-" in p]
    assert linked, fs.ls(f"{s3_bucket}/run/last.ckpt")


def test_last_checkpoint_finds_the_newest_on_an_object_store(
    s3_server, s3_bucket, tmp_path, capsys
):
    """Lightning 2.6's ckpt_path="last" finds nothing under s3:// and fails on an
    on_exception.ckpt there; last_checkpoint(dirpath) names the newest checkpoint. A
    damaged manifest is passed over; a half-swapped last.ckpt is found by its name."""
    from ckptstore.integrations.lightning import last_checkpoint

    io = CkptStoreCheckpointIO(codec="none", async_save=False)
    root = f"s3://{s3_bucket}/last"
    assert last_checkpoint(root) is None
    for name in ("epoch=0-step=5.ckpt", "last.ckpt", "on_exception.ckpt"):
        io.save_checkpoint({"w": torch.ones(3), "name": name}, f"{root}/{name}")
        time.sleep(0.01)  # (ordered by when each save began)
    assert last_checkpoint(root) == f"{root}/on_exception.ckpt"
    assert io.load_checkpoint(last_checkpoint(root))["name"] == "on_exception.ckpt"
    # (ls of one such checkpoint on S3 said "no committed checkpoints")
    assert cli_main(["ls", f"{root}/on_exception.ckpt", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [c["name"] for c in listed] == ["on_exception.ckpt"], listed
    s3_server.fs().pipe_file(f"{s3_bucket}/last/on_exception.ckpt/manifest.json", b"{")
    assert last_checkpoint(root) == f"{root}/last.ckpt"
    io.teardown()
    local = tmp_path / "ckpts"
    io = CkptStoreCheckpointIO(codec="none", async_save=False)
    for name in ("epoch=0-step=5.ckpt", "last.ckpt"):
        io.save_checkpoint({"w": torch.ones(3)}, str(local / name))
        time.sleep(0.01)
    io.teardown()
    os.rename(local / "last.ckpt", local / "last.ckpt.replacing")
    assert last_checkpoint(local) == f"{local}/last.ckpt"
    assert last_checkpoint(tmp_path / "missing") is None


def test_incremental_saves_stop_linking_a_shared_file_found_damaged(tmp_path, caplog):
    """On a local disk every checkpoint of a chain holds one copy of the frozen bytes:
    once a save's check reads it damaged, the next save writes everything and later
    ones link from that."""
    io = CkptStoreCheckpointIO(codec="none", incremental=True, async_save=False)
    frozen = torch.randn(256, 1024)  # 1 MB

    def state(step):
        return {"frozen": frozen, "adapter": torch.full((8,), float(step)), "global_step": step}

    def path(step):
        return str(tmp_path / f"s{step}.ckpt")

    io.save_checkpoint(state(1), path(1))
    io.save_checkpoint(state(2), path(2))  # links s1's file (then checked: intact)
    io.wait()
    shared = os.path.join(path(1), "__0_0.distcp")
    assert os.stat(shared).st_ino == os.stat(os.path.join(path(2), "__0_0-s1.ckpt.distcp")).st_ino
    with open(shared, "r+b") as f:  # bit rot inside the frozen tensor's bytes
        f.seek(os.path.getsize(shared) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    with caplog.at_level("ERROR", logger="ckptstore"):
        io.save_checkpoint(state(3), path(3))  # links it (its index is intact): damaged
        io.wait()
    assert f"{tmp_path}/s3.ckpt is damaged" in caplog.text, caplog.text
    assert "the next save to" in caplog.text and "writes everything" in caplog.text
    io.save_checkpoint(state(4), path(4))
    io.save_checkpoint(state(5), path(5))
    io.teardown()
    assert linked_files(path(4)) == [] and problems(path(4)) == []
    assert_same(ckptstore.read(path(4)), state(4))
    assert linked_files(path(5)) == ["__0_0-s4.ckpt.distcp"] and problems(path(5)) == []


def test_a_checkpoint_that_cannot_be_read_through_counts_as_damaged(tmp_path, caplog, monkeypatch):
    """As the manager's read (review): an OSError (EIO) while checking a save was only
    warned about, and the next saves linked the unreadable file on."""
    import ckptstore.integrations.lightning as lightning_mod

    io = CkptStoreCheckpointIO(codec="none", incremental=True, async_save=False)
    frozen = torch.randn(256, 1024)  # 1 MB

    def state(step):
        return {"frozen": frozen, "adapter": torch.full((8,), float(step)), "global_step": step}

    def unreadable(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    try:
        io.save_checkpoint(state(1), str(tmp_path / "s1.ckpt"))
        io.wait()
        with monkeypatch.context() as m, caplog.at_level("ERROR", logger="ckptstore"):
            m.setattr(lightning_mod, "verify", unreadable)
            io.save_checkpoint(state(2), str(tmp_path / "s2.ckpt"))  # links s1's file
            io.wait()
        assert f"{tmp_path}/s2.ckpt is damaged (could not read it through" in caplog.text
        io.save_checkpoint(state(3), str(tmp_path / "s3.ckpt"))
    finally:
        io.teardown()
    assert linked_files(str(tmp_path / "s2.ckpt")) != []
    assert linked_files(str(tmp_path / "s3.ckpt")) == []  # written in full


def test_a_checkpoint_removed_before_its_check_is_not_called_damaged(tmp_path, caplog):
    io = SlowIO(codec="none", incremental=True)  # the removal queues behind the save
    frozen = torch.randn(256, 1024)
    for step in (1, 2):
        io.save_checkpoint({"frozen": frozen, "step": step}, str(tmp_path / f"s{step}.ckpt"))
    with caplog.at_level("ERROR", logger="ckptstore"):
        io.remove_checkpoint(str(tmp_path / "s2.ckpt"))  # before s2's check runs
        io.wait()
        io.save_checkpoint({"frozen": frozen, "step": 3}, str(tmp_path / "s3.ckpt"))
        io.teardown()
    assert "damaged" not in caplog.text, caplog.text
    assert entries(str(tmp_path)) == ["s1.ckpt", "s3.ckpt"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"incremental": "yes"}, "incremental must be True or False"),
        ({"incremental": True, "full_every": -1}, "full_every must be an int >= 0"),
        ({"trust_version_counters": True}, "pass incremental=True too"),
    ],
)
def test_incremental_options_are_checked(options, message):
    with pytest.raises((ckptstore.errors.InvalidArgumentError, TypeError), match=message):
        CkptStoreCheckpointIO(**options)


@pytest.mark.parametrize("incremental", [False, True])
def test_a_save_queued_when_the_script_ends_is_written(tmp_path, incremental):
    """``trainer.save_checkpoint`` after ``fit`` (whose teardown already ran) and then
    the end of the script: the interpreter's exit used to stop the executors under the
    save, which was lost (an error line, exit status 0)."""
    script = (
        "import sys, torch\n"
        "from ckptstore.integrations.lightning import CkptStoreCheckpointIO\n"
        f"io = CkptStoreCheckpointIO(codec='none', incremental={incremental})\n"
        "frozen = torch.randn(512, 1024)\n"
        "io.save_checkpoint({'frozen': frozen, 'step': 1}, sys.argv[1] + '/s1.ckpt')\n"
        "io.teardown()\n"
        "io.save_checkpoint({'frozen': frozen, 'step': 2}, sys.argv[1] + '/final.ckpt')\n"
    )
    script_ends_cleanly(script, str(tmp_path))
    assert entries(str(tmp_path)) == ["final.ckpt", "s1.ckpt"]
    assert problems(str(tmp_path / "final.ckpt")) == []
    assert ckptstore.read(tmp_path / "final.ckpt")["step"] == 2


def test_ddp_on_two_cpu_processes_does_not_hang(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests")])
    env["GLOO_SOCKET_IFNAME"] = "lo"
    # Lightning starts rank 1 by running the script again: its own session, so that a
    # hang kills both ranks, not only the first.
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "lightning_worker.py"), "ddp", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the DDP run hung (killed after 120 s):\n{out[-3000:]}")
    assert proc.returncode == 0, out[-4000:]
    assert (tmp_path / "ok").exists()


# ---- examples/lightning_example.py: SIGTERM mid-epoch, rerun, bit-identical (issue 16) ----

EXAMPLE = os.path.join(REPO, "examples", "lightning_example.py")
# 448 samples in batches of 32: 14 steps an epoch in 1 process, 7 per rank in 2; step 10
# is mid-epoch either way, and no checkpoint or validation falls on it (every 7 steps).
RUN = ["--steps", "24", "--epochs", "10"]


def run_lightning_example(cwd, *args: str, timeout: float = 120) -> tuple[int, str]:
    """The example as a user runs it, in its own session: under DDP Lightning starts
    rank 1 by running the script again, and a hang or a leftover kills both."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.Popen(
        [sys.executable, EXAMPLE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)  # until every rank closed the pipe
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"lightning_example.py {' '.join(args)} hung (killed):\n{out[-3000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of it outlives the test
    return proc.returncode, out


def stop_at_step_10(tmp_path, devices: int) -> None:
    """Run the example in ``tmp_path/b`` until SIGTERM after step 10; check what it saved."""
    rc, out = run_lightning_example(
        tmp_path, "--dir", "b", *RUN, "--devices", str(devices), "--stop-after", "10"
    )
    assert rc == 128 + signal.SIGTERM and "SIGTERM: saved" in out, out[-4000:]
    saved = ckptstore.read(tmp_path / "b" / "on_exception.ckpt")
    assert saved["global_step"] == 10
    per_epoch = 14 // devices
    # The train loader's position, which Lightning saves and hands back: mid-epoch.
    [loader] = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert (loader["epoch"], loader["batches_taken"]) == divmod(10, per_epoch)
    assert loader["world_size"] == devices


@pytest.mark.parametrize("devices", [1, 2])
def test_example_stopped_by_sigterm_mid_epoch_resumes_bit_identical(tmp_path, devices):
    both = [*RUN, "--devices", str(devices)]
    rc, out = run_lightning_example(tmp_path, "--dir", "a", *both, "--out", "a.pt")
    assert rc == 0, out[-4000:]
    stop_at_step_10(tmp_path, devices)
    rc, out = run_lightning_example(tmp_path, "--dir", "b", *both, "--out", "b.pt")
    assert rc == 0, out[-4000:]
    assert "resumed from b/on_exception.ckpt" in out, out[-4000:]
    whole = torch.load(tmp_path / "a.pt", weights_only=True)
    resumed = torch.load(tmp_path / "b.pt", weights_only=True)
    assert whole["optimizer"]["state"][0]["step"].item() == 24
    assert_same(whole, resumed)  # weights and AdamW's moments, bit for bit
    assert not (tmp_path / "b" / "on_exception.ckpt").exists()  # removed once fit finished


def test_example_fine_tuned_incrementally_resumes_bit_identical(tmp_path):
    """The example as a fine-tuning user runs it (--finetune --incremental): stopped by
    SIGTERM and rerun, it ends as a run never stopped, its saves link the frozen layer,
    and the directory verifies whole."""
    both = [*RUN, "--finetune", "--incremental"]
    rc, out = run_lightning_example(tmp_path, "--dir", "a", *both, "--out", "a.pt")
    assert rc == 0, out[-4000:]
    rc, out = run_lightning_example(tmp_path, "--dir", "b", *both, "--stop-after", "10")
    assert rc == 128 + signal.SIGTERM and "SIGTERM: saved" in out, out[-4000:]
    rc, out = run_lightning_example(tmp_path, "--dir", "b", *both, "--out", "b.pt")
    assert rc == 0 and "resumed from b/on_exception.ckpt" in out, out[-4000:]
    assert_same(
        torch.load(tmp_path / "a.pt", weights_only=True),
        torch.load(tmp_path / "b.pt", weights_only=True),
    )
    assert linked_files(str(tmp_path / "b" / "last.ckpt"))  # links its step's top-k save
    assert cli_main(["verify", str(tmp_path / "b")]) == 0


def test_example_refuses_a_damaged_last_checkpoint_without_saving_over_the_run(tmp_path):
    """A rerun that finds last.ckpt damaged fails, naming the file; it used to save the
    untrained model as on_exception.ckpt (step 0), which the next rerun "resumed" from."""
    rc, out = run_lightning_example(tmp_path, "--dir", "b", "--steps", "14", "--epochs", "10")
    assert rc == 0, out[-4000:]
    [shard] = [f for f in os.listdir(tmp_path / "b" / "last.ckpt") if f.startswith("__0_0")]
    path = tmp_path / "b" / "last.ckpt" / shard
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    rc, out = run_lightning_example(tmp_path, "--dir", "b", *RUN)
    assert rc != 0 and "CorruptCheckpointError" in out and "checksum mismatch" in out, out[-4000:]
    assert not (tmp_path / "b" / "on_exception.ckpt").exists()


def test_example_stopped_under_ddp_resumes_on_one_process(tmp_path):
    stop_at_step_10(tmp_path, devices=2)
    rc, out = run_lightning_example(tmp_path, "--dir", "b", *RUN, "--devices", "1", "--out", "b.pt")
    assert rc == 0, out[-4000:]
    assert "resumed from b/on_exception.ckpt" in out, out[-4000:]
    resumed = torch.load(tmp_path / "b.pt", weights_only=True)
    assert resumed["optimizer"]["state"][0]["step"].item() == 24  # 10 on 2 ranks, 14 on 1


def test_resumable_loader_starts_the_next_epoch_after_a_loop_that_stopped_at_its_length():
    # Lightning takes len(loader) batches and never asks for one more, so the loader's
    # iteration never ends by itself; the next iter() must begin the next epoch.
    from torch.utils.data import TensorDataset

    loader = ckptstore.ResumableDataLoader(TensorDataset(torch.arange(8)), batch_size=2, seed=0)
    first = [b for _, b in zip(range(len(loader)), iter(loader), strict=False)]
    assert (loader.epoch, loader.batches_taken) == (0, 4)
    second = list(loader)
    assert len(second) == 4 and loader.epoch == 2  # all of epoch 1, then its end
    seen = [torch.cat([b for (b,) in batches]).sort().values for batches in (first, second)]
    assert all(torch.equal(s, torch.arange(8)) for s in seen)
