"""Issue 16, interop both ways with plain DCP directories: ``ckptstore import`` of a
directory ``dcp.save`` wrote (sharded over 2 ranks, as torchtitan writes them), and
``ckptstore export --format dcp`` to a directory stock ``dcp.load`` reads; a crafted
``.metadata`` is refused, not unpickled."""

from __future__ import annotations

import os
import pickle
import subprocess

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import assert_same, run_cli
from test_distributed import run_ranks

import ckptstore

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args)


def state() -> dict:
    return {
        "model": {"w": torch.randn(8, 4), "b": torch.arange(4)},
        "train_state": {"step": 5, "lrs": [0.1, 0.01]},
    }


def test_a_dcp_directory_imports_and_a_checkpoint_exports_to_one(tmp_path):
    sd = state()
    dcp.save(sd, checkpoint_id=tmp_path / "dcp-in", no_dist=True)
    out = cli("import", str(tmp_path / "dcp-in"), str(tmp_path / "root"), "--step", "5")
    assert out.returncode == 0, out.stderr
    got = {
        "model": {"w": torch.zeros(8, 4), "b": torch.zeros(4, dtype=torch.long)},
        "train_state": {"step": 0, "lrs": [0.0, 0.0]},
    }
    ckptstore.load(got, tmp_path / "root" / "step_00000005")
    assert_same(got, sd)
    assert cli("verify", str(tmp_path / "root")).returncode == 0  # checksums added
    out = cli("export", str(tmp_path / "root"), str(tmp_path / "dcp-out"), "--format", "dcp")
    assert out.returncode == 0, out.stderr
    back = {"model": {"w": torch.zeros(8, 4), "b": torch.zeros(4, dtype=torch.long)}}
    dcp.load(back, checkpoint_id=tmp_path / "dcp-out", no_dist=True)  # stock DCP reader
    assert_same(back["model"], sd["model"])
    again = cli("export", str(tmp_path / "root"), str(tmp_path / "dcp-out"), "--format", "dcp")
    assert again.returncode == 1 and "--force" in again.stderr


def test_export_force_replaces_an_earlier_export_but_never_other_files(tmp_path, capsys):
    from ckptstore.cli.main import main

    root = str(tmp_path / "root" / "step_00000005")
    ckptstore.save(state(), root)
    out = tmp_path / "out"
    ckptstore.save(state(), tmp_path / "dcp" / "step_00000001")  # a ckptstore root
    assert main(["export", root, str(out), "--format", "dcp"]) == 0
    assert main(["export", root, str(out), "--format", "dcp", "--force"]) == 0
    assert capsys.readouterr().out.count("replaced") == 1
    mine = tmp_path / "mine"  # a directory of the user's own files, given by mistake
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "a.txt").write_text("keep me")
    for target, fmt in ((mine, "dcp"), (mine, "pt"), (tmp_path / "dcp", "dcp")):
        assert main(["export", root, str(target), "--format", fmt, "--force"]) != 0
    err = capsys.readouterr().err
    assert "not a DCP checkpoint's (notes)" in err and "is a directory" in err
    assert (mine / "notes" / "a.txt").read_text() == "keep me"
    from ckptstore.interop import write_dcp_dir

    with pytest.raises(ckptstore.errors.ExportError, match="not replacing"):
        write_dcp_dir(state(), str(mine), overwrite=True)
    assert (mine / "notes" / "a.txt").read_text() == "keep me"


def test_import_into_the_dcp_directory_itself_is_refused(tmp_path, capsys):
    from ckptstore.cli.main import main

    d = tmp_path / "dcp-in"
    dcp.save(state(), checkpoint_id=d, no_dist=True)
    before = sorted(os.listdir(d))
    for root in (d, d / "ckpts"):
        assert main(["import", str(d), str(root)]) == 2
        assert "is the DCP directory itself or inside it" in capsys.readouterr().err
    assert sorted(os.listdir(d)) == before


def test_a_sharded_dcp_directory_from_two_ranks_imports(tmp_path):
    run_ranks("save_plain_dcp", str(tmp_path), 2)
    from dist_worker import full_state

    out = cli("import", str(tmp_path / "ckpts" / "plain-dcp"), str(tmp_path / "root"))
    assert out.returncode == 0, out.stderr
    got = {k: torch.zeros_like(v) for k, v in full_state(0).items()}
    ckptstore.load(got, tmp_path / "root" / "step_00000000")
    assert_same(got, full_state(0))


def test_a_crafted_metadata_is_refused(tmp_path):
    d = tmp_path / "evil"
    dcp.save(state(), checkpoint_id=d, no_dist=True)
    (d / ".metadata").write_bytes(pickle.dumps(os.system))  # would run code if unpickled
    out = cli("import", str(d), str(tmp_path / "root"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "refusing to unpickle" in out.stderr


def test_a_directory_that_is_not_dcp_is_a_usage_error(tmp_path):
    (tmp_path / "plain").mkdir()
    out = cli("import", str(tmp_path / "plain"), str(tmp_path / "root"))
    assert out.returncode == 2 and "not a DCP checkpoint" in out.stderr
