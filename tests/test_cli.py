"""The ``ckptstore`` command line, run as a user runs it: real processes on local and S3 roots.

Each command goes through ``python -m ckptstore`` (and the console script) at least once;
a process costs ~3 s of importing torch on 2 cores, so independent ones run side by
side, and further cases of the same command call :func:`ckptstore.cli.main` in this
process (the same code, without the interpreter start).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from helpers import REPO, assert_same, every_dtype, train_gpt
from test_distributed import run_ranks

import ckptstore
from ckptstore.cli import main

try:  # in the `bench` extra, not `test`: without it the .safetensors cases use .pt
    import safetensors.torch as safetensors_torch
except ImportError:
    safetensors_torch = None
ST = ".safetensors" if safetensors_torch is not None else ".pt"


# ---- running the command ------------------------------------------------------------
def env() -> dict[str, str]:
    e = dict(os.environ)  # the S3 session fixture's AWS_* variables included
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


def cli(*args: Any, script: bool = False, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """One ``python -m ckptstore ARGS`` (or the installed ``ckptstore`` script)."""
    exe = shutil.which("ckptstore", path=os.path.dirname(sys.executable))
    head = [exe] if script and exe else [sys.executable, "-m", "ckptstore"]
    return subprocess.run(
        [*head, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(),
        cwd=REPO,
        check=False,
    )


def cli_many(*commands: list[Any]) -> list[subprocess.CompletedProcess[str]]:
    """Independent commands, each its own process, all at once. A command ending in
    ``"script"`` runs through the installed console script."""

    def one(c: list[Any]) -> subprocess.CompletedProcess[str]:
        return cli(*c[:-1], script=True) if c[-1] == "script" else cli(*c)

    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(one, commands))


def run_main(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def load_export(path: Any) -> Any:
    """An exported file, read as an inference stack would (never unpickling code)."""
    if str(path).endswith(".safetensors"):
        assert safetensors_torch is not None
        return safetensors_torch.load_file(path)
    return torch.load(path, weights_only=True)


def show(p: subprocess.CompletedProcess[str]) -> str:
    return f"exit {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"


# ---- checkpoints to work on ---------------------------------------------------------
def make_state() -> dict[str, Any]:
    """Model + AdamW (integer-keyed state) + every dtype + Python values."""
    model, opt, _ = train_gpt("tiny", steps=2)
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "tensors": every_dtype(),
        "step": 7,
        "name": "exp-1",
        "nested": {"a": [1, 2.5, "x", (3, 4)]},
    }


LOSSES = [3.0, 2.5, 2.7, 2.9]  # step_00000020 is the best; step_00000040 ends the run


def save_run(root: str, state: dict[str, Any]) -> None:
    """step_00000010 .. step_00000040 through the manager (tags: latest, best, final)."""
    with ckptstore.CheckpointManager(root, codec="none") as mgr:
        for i, loss in enumerate(LOSSES):
            mgr.save(
                10 * (i + 1) - 1,
                state,
                epoch=i // 2,
                metrics={"val_loss": loss},
                reason="final" if i == len(LOSSES) - 1 else "interval",
            )
        mgr.wait()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    root = str(tmp_path_factory.mktemp("cli") / "run")
    state = make_state()
    save_run(root, state)
    return root, state


@pytest.fixture
def run_copy(saved, tmp_path) -> str:
    """A copy of the saved run that a test may change."""
    dst = str(tmp_path / "run")
    shutil.copytree(saved[0], dst)
    return dst


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def add_leftovers(root: str) -> None:
    """What a dead save leaves (a temp directory, old), an uncommitted step directory, and
    a checkpoint whose manifest is damaged."""
    tmp = os.path.join(root, ".tmp-step_00000050-0123456789ab")
    os.makedirs(tmp)
    with open(os.path.join(tmp, "__0_0.distcp"), "wb") as f:
        f.write(b"partial")
    os.utime(tmp, (1e9, 1e9))
    os.makedirs(os.path.join(root, "step_00000060"))
    shutil.copytree(os.path.join(root, "step_00000040"), os.path.join(root, "step_00000070"))
    flip_byte(os.path.join(root, "step_00000070", "manifest.json"), 40)


# ---- entry points, help, usage errors -----------------------------------------------
def test_entry_points_help_bench_and_usage_errors(saved, capsys):
    root, _ = saved
    helped, missing = cli_many(["--help", "script"], ["ls", "/nonexistent/ckpts"])
    assert helped.returncode == 0, show(helped)
    for command in ("ls", "info", "verify", "export", "import", "prune", "sync", "pull", "gc"):
        assert f"\n    {command} " in helped.stdout
    assert missing.returncode == 2, show(missing)
    assert "no such directory" in missing.stderr and "check the path" in missing.stderr
    with pytest.raises(SystemExit) as exc:  # the suite's own options (tests/test_bench.py)
        main(["bench", "--help"])
    assert exc.value.code == 0 and "--smoke" in capsys.readouterr().out

    for command in ("ls", "info", "verify", "export", "import", "prune", "sync", "pull", "gc"):
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert "examples:" in out and f"ckptstore {command} " in out.split("examples:")[1]

    cases = [
        ([], "usage: ckptstore"),
        (["bogus"], "invalid choice"),
        (["ls"], "required: ROOT"),
        (["export", root, "out.txt"], "--format"),
        (["export", root, "out.pt", "--only", "nope"], "top-level entries are"),
        (["info", root, "--step", "7"], "no committed checkpoint step_00000007"),
        (["info", f"{root}/step_00000099"], "is not there"),
        (["prune", root], "needs a retention policy"),
        (["prune", root, "--keep-best", "1"], "--keep-best needs --metric"),
        (["prune", root, "--keep-last", "0"], "must be at least 1"),
        (["import", f"{root}/missing.pt", root], "no such file"),
        (["gc", root, "--grace-s", "-1"], "--grace-s must be >= 0"),
    ]
    for args, expected in cases:
        code, out, err = run_main(capsys, *args)
        assert code == 2, (args, out, err)
        assert expected in out + err, (args, out, err)


def test_a_command_imports_only_its_own_module():
    """``ckptstore --help`` lists the commands without importing any; ``ckptstore ls``
    imports ls (and what ls imports), not the modules of the other commands."""
    code = (
        "import contextlib, io, sys\n"
        "from ckptstore.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "    main(sys.argv[1:])\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('ckptstore.cli.'))))"
    )
    procs = [
        subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            env=env(),
            timeout=180,
            check=False,
        )
        for args in (["--help"], ["ls", "/nonexistent/ckpts"])
    ]
    for p in procs:
        assert p.returncode == 0, show(p)
    helped, listed = (set(p.stdout.split()) for p in procs)
    assert helped == {"ckptstore.cli.main"}, helped
    assert listed == {
        "ckptstore.cli.main",
        "ckptstore.cli._common",
        "ckptstore.cli.ls",
        "ckptstore.cli.retention_options",
    }, listed


# ---- ls / info / verify -------------------------------------------------------------
def test_ls_info_and_verify_on_a_local_root(saved, run_copy, capsys):
    root, state = saved
    add_leftovers(run_copy)
    everything, info = cli_many(
        ["ls", run_copy, "--all", "--json"], ["info", f"{root}/step_00000020", "--json"]
    )
    assert everything.returncode == 0, show(everything)
    by_name = {c["name"]: c for c in json.loads(everything.stdout)["checkpoints"]}
    assert by_name[".tmp-step_00000050-0123456789ab"]["status"] == "uncommitted"
    assert by_name["step_00000060"]["status"] == "uncommitted"
    assert by_name["step_00000070"]["status"] == "corrupt"
    assert "step_00000070/manifest.json" in by_name["step_00000070"]["error"]
    first = by_name["step_00000010"]
    assert first["status"] == "committed" and first["epoch"] == 0 and first["reason"] == "interval"
    assert first["metrics"] == {"val_loss": 3.0} and first["stored_bytes"] > 0
    assert by_name["step_00000040"]["tags"] == ["latest", "final"]

    assert info.returncode == 0, show(info)
    got = json.loads(info.stdout)
    assert got["step"] == 20 and got["world_size"] == 1 and got["format_version"] == 1
    assert got["codec"]["id"] == "none" and got["metrics"] == {"val_loss": 2.5}
    assert set(got["groups"]) == {"model", "optim", "tensors", "step", "name", "nested"}
    entries = {e["key"]: e for e in got["entries"]}
    wte = entries["model.wte.weight"]
    want = state["model"]["wte.weight"]
    assert wte["dtype"] == "float32" and wte["shape"] == list(want.shape)
    assert wte["bytes"] == want.numel() * 4 and wte["sharding"] == "-" and wte["codec"] == "none"
    assert entries["tensors.bf16"]["dtype"] == "bfloat16"
    assert entries["step"]["kind"] == "value"
    assert got["groups"]["model"]["tensors"] == len(state["model"])

    # The human forms, and more cases, in this process.
    code, out, _ = run_main(capsys, "ls", run_copy)
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("step_")}
    assert sorted(rows) == [f"step_000000{s}0" for s in (1, 2, 3, 4)]  # committed ones only
    assert rows["step_00000020"].split()[-1] == "best"
    assert rows["step_00000040"].split()[-1] == "latest,final"
    assert "interval" in rows["step_00000010"] and "val_loss=3" in rows["step_00000010"]
    assert "4 committed checkpoint(s)" in out
    # a damaged manifest is not listed, but named (stranger test: it vanished silently)
    assert f"note: step_00000070: manifest damaged or unreadable, not listed (CORRUPT in `ckptstore ls {run_copy} --all`" in out  # fmt: skip
    code, out, _ = run_main(capsys, "ls", os.path.join(run_copy, "step_00000040"))
    assert code == 0 and "step_00000070" not in out  # (one checkpoint asked for: its row)
    code, out, _ = run_main(capsys, "ls", run_copy, "--all")
    assert code == 0
    assert "CORRUPT" in out and "UNCOMMITTED" in out and f"ckptstore gc {run_copy}" in out
    # gc never removes a step directory without a manifest: not promised (stranger test)
    assert "step_00000060: no manifest, so no checkpoint" in out
    assert f"ckptstore quarantine {run_copy} STEP" in out
    os.makedirs(os.path.join(run_copy, ".tmp-deleted-step_00000005-0123456789ab"))
    code, out, _ = run_main(capsys, "ls", run_copy, "--all")
    assert ".tmp-deleted-step_00000005-0123456789ab: a deletion in progress" in out
    os.rmdir(os.path.join(run_copy, ".tmp-deleted-step_00000005-0123456789ab"))
    code, out, _ = run_main(capsys, "verify", f"{root}/step_00000020")
    assert code == 0 and "OK   step_00000020" in out
    code, out, _ = run_main(capsys, "ls", root, "--keep-every-steps", "20")
    kept = [line.split()[0] for line in out.splitlines() if "kept" in line]
    assert kept == ["step_00000020", "step_00000040"]
    code, out, _ = run_main(capsys, "info", root, "--step", "40")
    assert code == 0
    assert "GROUP" in out and "model.wte.weight" in out and "float32" in out
    assert "world size  1" in out and "ckptstore 1" in out
    code, out, _ = run_main(capsys, "info", root, "--only", "model", "--json")
    assert {e["group"] for e in json.loads(out)["entries"]} == {"model"}


@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_verify_catches_each_corruption_and_names_the_file(tmp_path, capsys, codec):
    root = str(tmp_path / "ckpts")
    g = torch.Generator().manual_seed(0)
    with ckptstore.Checkpointer(root, codec=codec, chunk_bytes=64 * 1024) as ckpt:
        for step in range(1, 10):
            ckpt.save({"w": torch.randn(50_000, generator=g), "step": step}, step)

    def where(step: int, name: str) -> str:
        return os.path.join(root, f"step_{step:08d}", name)

    flip_byte(where(2, "__0_0.distcp"), 1000)  # a flipped bit in the data
    shard = where(3, "__0_0.distcp")
    os.truncate(shard, os.path.getsize(shard) - 100)  # truncated
    os.remove(where(4, "__0_0.distcp"))  # deleted
    flip_byte(where(5, "manifest.json"), 60)  # damaged manifest
    flip_byte(where(6, ".metadata"), 10)  # damaged DCP metadata
    shard = where(7, "__0_0.distcp")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:  # zeroed tail (index and trailer)
        f.seek(size - 4096)
        f.write(bytes(4096))
    shutil.copy(where(1, "__0_0.distcp"), where(8, "__0_0.distcp"))  # another one's shard
    os.remove(where(9, ".metadata"))  # DCP metadata deleted
    expected = {
        2: ["__0_0.distcp", "checksum mismatch"],
        3: ["__0_0.distcp", "truncated"],
        4: ["__0_0.distcp", "missing"],
        5: ["manifest.json"],
        6: [".metadata"],
        7: ["__0_0.distcp"],
        8: ["__0_0.distcp"],
        9: [".metadata", "missing"],
    }
    if codec == "zstd":
        whole = cli("verify", root, "--json")
        assert whole.returncode == 1, show(whole)
        report = json.loads(whole.stdout)
        assert report["ok"] is False
        results = {r["name"]: r for r in report["checkpoints"]}
    else:
        code, out, _ = run_main(capsys, "verify", root, "--json")
        assert code == 1
        results = {r["name"]: r for r in json.loads(out)["checkpoints"]}
    assert results["step_00000001"]["ok"] and results["step_00000001"]["problems"] == []
    for step, words in expected.items():
        r = results[f"step_{step:08d}"]
        assert not r["ok"], r
        text = " ".join(r["problems"])
        for word in words:
            assert word in text, (step, word, text)
        assert f"step_{step:08d}/" in text  # the bad file, by its path

    code, out, _ = run_main(capsys, "verify", root)
    assert code == 1
    assert "BAD  step_00000002" in out and "OK   step_00000001" in out
    assert "8 of 9 checkpoint(s) damaged" in out and "intact one" in out  # what to do next
    code, out, _ = run_main(capsys, "verify", where(2, ""))
    assert code == 1 and "checksum mismatch" in out
    code, out, _ = run_main(capsys, "verify", root, "--step", "1")
    assert code == 0 and "intact" in out


# ---- export / import ----------------------------------------------------------------
def test_export_to_pt_and_safetensors_equals_the_saved_state(saved, tmp_path, capsys):
    root, state = saved
    full, model, bf16 = (str(tmp_path / n) for n in ("full.pt", f"model{ST}", f"bf16{ST}"))
    runs = cli_many(
        ["export", f"{root}/step_00000040", full],
        ["export", root, bf16, "--only", "model", "--dtype", "bf16"],  # the newest
    )
    for p in runs:
        assert p.returncode == 0, show(p)
    assert "the newest under" in runs[1].stderr and "step_00000040" in runs[1].stderr
    code, _, err = run_main(capsys, "export", root, "--step", "40", model, "--only", "model")
    assert code == 0, err

    # The whole state: nesting, Python values, integer optimizer keys, every dtype.
    assert_same(state, torch.load(full, weights_only=True))
    # safetensors: the model's state_dict, prefix removed, bit for bit.
    assert_same(state["model"], load_export(model))
    got = load_export(bf16)
    floats = (torch.float32, torch.float16, torch.float64)
    want = {k: v.to(torch.bfloat16) if v.dtype in floats else v for k, v in state["model"].items()}
    assert_same(want, got)

    # More cases of the same command, in this process.
    code, _, _ = run_main(capsys, "export", root, str(tmp_path / "optim.pt"), "--only", "optim")
    assert code == 0
    optim = torch.load(tmp_path / "optim.pt", weights_only=True)
    assert_same(state["optim"], optim)
    model_, _, _ = train_gpt("tiny", steps=0)
    opt = torch.optim.AdamW(model_.parameters())
    opt.load_state_dict(optim)  # integer keys: every parameter gets its state back
    assert len(opt.state) == len(state["optim"]["state"])

    code, _, _ = run_main(
        capsys, "export", root, str(tmp_path / "kp.pt"), "--only", "tensors", "--keep-prefix",
        "--dtype", "fp16",
    )  # fmt: skip
    assert code == 0
    kp = torch.load(tmp_path / "kp.pt", weights_only=True)
    assert set(kp) == {"tensors"}
    assert kp["tensors"]["f64"].dtype == torch.float16  # plain floats cast
    for name in ("f8", "c64", "i64", "bool"):  # fp8, complex, integer, bool: as stored
        assert_same(state["tensors"][name].contiguous(), kp["tensors"][name])

    code, _, err = run_main(capsys, "export", root, model)
    assert code == 1 and "already exists" in err and "--force" in err
    if safetensors_torch is not None:
        code, _, err = run_main(capsys, "export", root, str(tmp_path / "all.safetensors"))
        assert code == 1 and "complex128" in err and ".pt" in err  # says what to do instead
        assert not os.path.exists(tmp_path / "all.safetensors")  # nothing half-written
    code, _, err = run_main(capsys, "export", root, model, "--only", "model", "--force")
    assert code == 0, err


def test_export_of_a_sharded_checkpoint(tmp_path, capsys):
    """Saved by 2 ranks (DTensor shards on different dims), exported by one process."""
    from dist_worker import full_state

    run_ranks("save_sharded", str(tmp_path), 2)
    ckpt = str(tmp_path / "ckpts" / "run" / "step_00000005")
    code, out, _ = run_main(capsys, "info", ckpt, "--json")
    assert code == 0
    got = json.loads(out)
    assert got["world_size"] == 2
    sharding = {e["key"]: e.get("sharding") for e in got["entries"]}
    assert (
        sharding["model.w"] == "2 shards on dim 0" and sharding["model.emb"] == "2 shards on dim 1"
    )
    code, _, err = run_main(capsys, "export", ckpt, str(tmp_path / "full.pt"))
    assert code == 0, err
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    assert_same(full_state(), full["model"])
    assert full["step"] == 5 and set(full["per_rank"]) == {"rank0", "rank1"}
    # A checkpoint saved by path (ckptstore.save), not numbered.
    code, _, err = run_main(
        capsys, "export", tmp_path / "ckpts" / "sync", tmp_path / f"m{ST}", "--only", "model"
    )
    assert code == 0, err
    assert_same(full_state(), load_export(tmp_path / f"m{ST}"))


def test_checkpoints_named_otherwise_beside_step_n_ones_are_named_and_verified(tmp_path, capsys):
    """A root holding step_N checkpoints and Lightning's ``*.ckpt`` ones: ``ls`` listed
    the step_N ones only and said nothing of the others, and ``verify`` checked only the
    step_N ones ("all 1 checkpoint(s) intact" over a damaged ``last.ckpt``). A
    checkpoint set aside (``step_N.damaged-...``) is neither. ``ls ROOT/step_N`` does
    not call the latest pointer's target uncommitted (it is, only not that row)."""
    from ckptstore.cli.main import main

    root = tmp_path / "mixed"
    with ckptstore.CheckpointManager(str(root)) as mgr:
        for step in (1, 2):
            mgr.save(step - 1, {"w": torch.ones(3)})
        mgr.wait()
    ckptstore.save({"w": torch.ones(3)}, str(root / "last.ckpt"))
    shutil.copytree(root / "step_00000001", root / "step_00000001.damaged-20261207T000000Z")
    assert main(["ls", str(root)]) == 0
    out = capsys.readouterr().out
    assert "note: 1 more checkpoint(s) here are named otherwise than step_N (last.ckpt" in out
    assert "damaged-" not in out, out
    assert main(["ls", str(root / "step_00000001")]) == 0
    out = capsys.readouterr().out
    assert "latest pointer" not in out, out
    shard = root / "last.ckpt" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1])  # damaged
    assert main(["verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert "OK   step_00000001" in out and "OK   step_00000002" in out, out
    assert "BAD  last.ckpt" in out and "1 of 3 checkpoint(s) damaged" in out, out


class NotAllowed:
    """A custom class: torch.load(weights_only=True) refuses to unpickle it."""


def test_a_root_of_checkpoints_named_otherwise_is_listed_and_verified_whole(tmp_path, capsys):
    """A directory of Lightning checkpoints (``*.ckpt``, each a checkpoint): ls and
    verify said there were none; they list and check them all (oldest first), and the
    commands about steps point at them."""
    from ckptstore.cli.main import main

    root = tmp_path / "lightning"
    for name in ("last.ckpt", "epoch=0-step=4.ckpt"):
        ckptstore.save({"w": torch.ones(3)}, str(root / name))
    assert main(["ls", str(root)]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines()[1:3]]
    assert rows == ["last.ckpt", "epoch=0-step=4.ckpt"], out  # by time saved
    assert "2 committed checkpoint(s) (named otherwise than step_N" in out, out
    assert main(["ls", str(root), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [(c["name"], c["step"]) for c in listed] == [
        ("last.ckpt", None),
        ("epoch=0-step=4.ckpt", None),
    ]
    assert main(["verify", str(root)]) == 0
    assert "all 2 checkpoint(s) intact" in capsys.readouterr().out
    shard = root / "last.ckpt" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1])  # damaged
    assert main(["verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert "last.ckpt" in out and "OK   epoch=0-step=4.ckpt" in out, out
    assert main(["export", str(root), str(tmp_path / "x.pt")]) == 2
    assert f"give one, e.g. {root}/last.ckpt" in capsys.readouterr().err
    # one checkpoint's path: its row, as its root lists it (a step_N one too)
    assert main(["ls", str(root / "epoch=0-step=4.ckpt")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[0] == "epoch=0-step=4.ckpt" and "1 committed" in out, out
    with ckptstore.Checkpointer(str(tmp_path / "steps")) as ckpt:
        for step in (1, 2):
            ckpt.save({"w": torch.ones(3)}, step=step)
    assert main(["ls", str(tmp_path / "steps" / "step_00000001")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[:2] == ["step_00000001", "1"] and "1 committed" in out, out
    # commands about a run's step_N checkpoints say they leave these alone
    assert main(["sync", str(root), str(tmp_path / "copy")]) == 1  # (a backup job notices)
    assert "sync and pull copy a run's step_N checkpoints only" in capsys.readouterr().err
    assert main(["prune", str(root), "--keep-last", "1", "--yes"]) == 0
    assert "2 checkpoint(s) named as Lightning names them are not pruned" in capsys.readouterr().out
    assert sorted(n for n in os.listdir(root) if n.endswith(".ckpt")) == [
        "epoch=0-step=4.ckpt",
        "last.ckpt",
    ]


def test_export_refuses_to_write_inside_a_checkpoint(tmp_path, capsys):
    from ckptstore.cli.main import main

    with ckptstore.Checkpointer(str(tmp_path / "root")) as ckpt:
        ckpt.save({"w": torch.ones(3)}, step=1)
    inside = tmp_path / "root" / "step_00000001"
    for out, extra in ((inside / "x.pt", []), (inside, ["--format", "dcp", "--force"])):
        assert main(["export", str(tmp_path / "root"), str(out), *extra]) == 2
        assert "is inside the committed checkpoint" in capsys.readouterr().err
    assert sorted(os.listdir(inside)) == [".metadata", "__0_0.distcp", "manifest.json"]
    # The root itself (--force renamed it aside and deleted it) and a file in it (latest)
    root = str(tmp_path / "root")
    assert main(["export", root, root, "--format", "dcp", "--force"]) == 2
    assert "holds checkpoints" in capsys.readouterr().err
    assert main(["export", root, os.path.join(root, "latest"), "--format", "pt", "--force"]) == 2
    assert "is inside the checkpoint root" in capsys.readouterr().err
    os.symlink(inside, tmp_path / "link")  # a link into one is inside it too
    assert main(["export", root, str(tmp_path / "link" / "x.pt")]) == 2
    assert main(["verify", root]) == 0
    assert main(["export", root, str(tmp_path / "out" / "x.pt")]) == 0  # elsewhere: fine


def test_import_then_export_round_trips(tmp_path, capsys):
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(16, 8, generator=g)
    _model, opt, _ = train_gpt("tiny", steps=1)
    hand = {  # a hand-rolled checkpoint: tied weights, optimizer, counters
        "model": {
            "emb.weight": emb,
            "head.weight": emb,
            "bias": torch.zeros(8, dtype=torch.float16),
        },
        "optimizer": opt.state_dict(),
        "epoch": 3,
    }
    torch.save(hand, tmp_path / "hand.pt")
    tensors = {"a": torch.randn(5, 3, generator=g).bfloat16(), "b": torch.arange(7)}
    pt_root, st_root = str(tmp_path / "a"), f"file://{tmp_path / 'b'}"
    imported = cli("import", tmp_path / "hand.pt", pt_root, "--step", "3000")
    assert imported.returncode == 0, show(imported)
    assert "step_00003000" in imported.stdout
    exported = cli("export", pt_root, tmp_path / "back.pt")
    assert exported.returncode == 0, show(exported)
    assert_same(hand, torch.load(tmp_path / "back.pt", weights_only=True))
    if safetensors_torch is not None:
        safetensors_torch.save_file(tensors, tmp_path / "w.safetensors", metadata={"format": "pt"})
    else:
        torch.save(tensors, tmp_path / f"w{ST}")
    code, _, err = run_main(capsys, "import", tmp_path / f"w{ST}", st_root)
    assert code == 0, err
    code, _, err = run_main(
        capsys, "export", f"{tmp_path / 'b'}/step_00000000", tmp_path / f"round{ST}"
    )
    assert code == 0, err
    assert_same(tensors, load_export(tmp_path / f"round{ST}"))
    with open(os.path.join(pt_root, "latest")) as f:
        assert f.read().strip() == "step_00003000"  # the newest, as after any save

    code, out, _ = run_main(capsys, "info", pt_root, "--json")
    meta = json.loads(out)["metadata"]
    assert meta == {"imported_from": "hand.pt", "imported_format": "torch.save"}
    code, _, err = run_main(capsys, "import", tmp_path / "hand.pt", pt_root, "--step", "3000")
    assert code == 1 and "never overwrites" in err and "--step 3001" in err
    torch.save({"x": NotAllowed()}, tmp_path / "evil.pt")
    code, _, err = run_main(capsys, "import", tmp_path / "evil.pt", pt_root, "--step", "1")
    assert code == 1 and "weights_only" in err and "re-save" in err
    assert not os.path.exists(os.path.join(pt_root, "step_00000001"))


# ---- prune / gc ---------------------------------------------------------------------
def test_commands_on_whole_roots_refuse_a_checkpoint_or_a_users_directory(
    run_copy, tmp_path, capsys
):
    """gc, sync/pull and quarantine given ROOT/step_N found nothing and said all was
    well (exit 0: a backup job reported success for copying nothing); quarantine moved
    a directory of the user's files aside as a damaged checkpoint."""
    ckpt = os.path.join(
        run_copy, sorted(n for n in os.listdir(run_copy) if n.startswith("step_"))[0]
    )
    step = str(int(os.path.basename(ckpt).split("_")[1]))
    for argv in (["gc", ckpt], ["sync", ckpt, str(tmp_path / "dst")], ["quarantine", ckpt, step]):
        assert main(argv) == 2, argv
        assert "is a checkpoint, not a checkpoint root" in capsys.readouterr().err
    mine = tmp_path / "mine" / "step_00000001" / "notes"
    mine.mkdir(parents=True)
    (mine / "a.txt").write_text("keep")
    assert main(["quarantine", str(tmp_path / "mine"), "1"]) == 1
    assert "is not a checkpoint: it holds notes/" in capsys.readouterr().err
    assert (mine / "a.txt").read_text() == "keep"
    assert not os.path.exists(tmp_path / "dst")


def test_import_and_sync_leave_a_users_latest_and_finals_as_they_are(run_copy, tmp_path, capsys):
    """Both wrote their pointers over whatever had those names (the review of 38f6651:
    the pointer check was bypassed)."""
    mine = "my notes: run 7 was the good one\n"
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "latest").write_text(mine)
    (dst / "finals").write_text(mine)
    assert main(["sync", run_copy, str(dst)]) == 0
    assert "could not update the pointers" in capsys.readouterr().err
    pt = tmp_path / "m.pt"
    torch.save({"model": {"w": torch.ones(2)}, "iter_num": 99999}, pt)
    assert main(["import", str(pt), str(dst)]) == 1
    assert f"imported step_00099999, but {dst}/latest does not hold" in capsys.readouterr().err
    assert (dst / "latest").read_text() == mine and (dst / "finals").read_text() == mine


def test_prune_shows_then_deletes_with_yes_and_gc_removes_dead_saves(
    saved, run_copy, tmp_path, capsys
):
    other = str(tmp_path / "other")
    shutil.copytree(saved[0], other)
    add_leftovers(other)
    policy = ["--keep-last", "1", "--keep-best", "1", "--metric", "val_loss"]
    dry, gc = cli_many(["prune", run_copy, *policy], ["gc", other, "--grace-s", "0"])
    assert dry.returncode == 0, show(dry)
    assert "would delete 2 checkpoint(s)" in dry.stdout and "--yes" in dry.stdout
    assert "step_00000010, step_00000030" in dry.stdout
    assert sorted(os.listdir(run_copy)).count("step_00000010") == 1  # nothing deleted
    assert gc.returncode == 0, show(gc)
    assert "removed  .tmp-step_00000050-0123456789ab" in gc.stdout
    # the 5 s a local sweep keeps whatever it is given, said (it printed "older than 0 s")
    assert "keeps leftovers younger than 5 s whatever it is given" in gc.stderr, show(gc)
    assert "(older than 5 s)" in gc.stdout, show(gc)
    assert not os.path.exists(os.path.join(other, ".tmp-step_00000050-0123456789ab"))
    assert os.path.exists(os.path.join(other, "step_00000040"))  # committed ones untouched

    code, out, _ = run_main(capsys, "prune", run_copy, *policy, "--yes", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["deleted"] == ["step_00000010", "step_00000030"]
    why = {c["name"]: c["why"] for c in report["checkpoints"]}
    assert "best 1 by val_loss" in why["step_00000020"] and "newest" in why["step_00000040"]
    assert [n for n in sorted(os.listdir(run_copy)) if n.startswith("step_")] == [
        "step_00000020",
        "step_00000040",
    ]
    # Never the newest or the one `latest` names, even when the policy would drop them.
    code, out, _ = run_main(capsys, "prune", run_copy, "--keep-every-steps", "1000", "--yes")
    assert code == 0 and "deleted 1 checkpoint(s): step_00000020" in out


def test_prune_yes_deletes_only_what_its_table_said_while_a_run_saves_meanwhile(
    run_copy, capsys, monkeypatch
):
    """A run commits step 40 between prune's listing and its deletion (stranger test):
    step 30, shown "keep" as the newest, stays; it used to be deleted from a fresh listing."""
    import ckptstore.cli.prune as prune_cli

    listed = prune_cli.list_checkpoints

    def before_step_40(backend, **kw):
        return [i for i in listed(backend, **kw) if i.name != "step_00000040"]

    monkeypatch.setattr(prune_cli, "list_checkpoints", before_step_40)
    code, out, _ = run_main(capsys, "prune", run_copy, "--keep-last", "1", "--yes")
    assert code == 0, out
    assert "step_00000030" in out and "deleted 2 checkpoint(s): step_00000010, step_00000020" in out
    assert [n for n in sorted(os.listdir(run_copy)) if n.startswith("step_")] == [
        "step_00000030",
        "step_00000040",
    ]


def test_prune_yes_spares_the_latest_its_table_showed_when_latest_moves_meanwhile(
    run_copy, capsys, monkeypatch
):
    """`latest` names step 20 when prune reads it (a run's housekeeping lagging) and
    step 40 when it deletes: step 20, shown "keep" as latest, stays."""
    import ckptstore.cli.prune as prune_cli
    from ckptstore.layout import LATEST_FILE

    with open(os.path.join(run_copy, LATEST_FILE), "w") as f:
        f.write("step_00000020\n")
    real = prune_cli.retention.prune

    def latest_moves_first(backend, *args, **kwargs):
        backend.put_atomic(LATEST_FILE, b"step_00000040\n")
        return real(backend, *args, **kwargs)

    monkeypatch.setattr(prune_cli.retention, "prune", latest_moves_first)
    code, out, _ = run_main(capsys, "prune", run_copy, "--keep-last", "1", "--yes")
    assert code == 0, out
    assert "deleted 2 checkpoint(s): step_00000010, step_00000030" in out
    assert [n for n in sorted(os.listdir(run_copy)) if n.startswith("step_")] == [
        "step_00000020",
        "step_00000040",
    ]


def test_commands_that_change_a_root_are_refused_while_a_run_writes_it(
    saved, run_copy, capsys, tmp_path
):
    """A run holds the root's writer lease: `prune --yes`, `quarantine`, and `sync`,
    `pull` and `import` into it say who holds it and what to do, and change nothing;
    `prune` without --yes still shows its plan."""
    exported = str(tmp_path / "w.pt")
    torch.save({"w": torch.zeros(3)}, exported)
    shutil.rmtree(os.path.join(run_copy, "step_00000020"))  # for sync and pull to copy
    before = sorted(os.listdir(run_copy))
    with ckptstore.CheckpointManager(run_copy, keep=ckptstore.KeepLast(10)):
        code, out, _ = run_main(capsys, "prune", run_copy, "--keep-last", "1")
        assert code == 0 and "would delete" in out, out
        code, _, err = run_main(capsys, "prune", run_copy, "--keep-last", "1", "--yes")
        assert code == 1 and f"is being written by process {os.getpid()}" in err, err
        assert "once it has stopped" in err
        code, _, err = run_main(capsys, "quarantine", run_copy, "30")
        assert code == 1 and "stop that run first" in err, err
        for command in (
            ["sync", saved[0], run_copy],  # (a copy in would collide with the run's saves)
            ["pull", saved[0], run_copy, "--step", "20"],
            ["import", exported, run_copy, "--step", "99"],
        ):
            code, _, err = run_main(capsys, *command)
            assert code == 1 and "is being written by process" in err, (command, err)
        assert sorted(os.listdir(run_copy)) == before
    code, out, _ = run_main(capsys, "prune", run_copy, "--keep-last", "1", "--yes")
    assert code == 0 and "deleted 2 checkpoint(s)" in out, out  # (the run has ended)


@pytest.mark.parametrize(
    "command", [["ls"], ["verify"], ["info"], ["export"], ["gc"], ["sync", "SRC"], ["pull", "SRC"]]
)
def test_an_empty_root_is_refused_not_taken_for_the_current_directory(
    saved, tmp_path, monkeypatch, capsys, command
):
    monkeypatch.chdir(tmp_path)
    args = [saved[0] if a == "SRC" else a for a in command]
    tail = [str(tmp_path / "out.pt")] if command == ["export"] else []
    code, _, err = run_main(capsys, *args, "", *tail)
    assert code == 2 and "must not be empty" in err, err
    assert os.listdir(tmp_path) == []


def test_a_checkpoint_is_refused_as_the_root_to_copy_or_import_into(
    saved, run_copy, capsys, tmp_path
):
    exported = str(tmp_path / "w.pt")
    torch.save({"w": torch.zeros(3)}, exported)
    inside = os.path.join(run_copy, "step_00000030")
    before = sorted(os.listdir(inside))
    for command in (
        ["sync", saved[0], inside],
        ["import", exported, inside, "--step", "7"],
        ["prune", inside, "--keep-last", "1", "--yes"],
    ):
        code, _, err = run_main(capsys, *command)
        assert code == 2 and "is a checkpoint, not a checkpoint root" in err, (command, err)
    assert sorted(os.listdir(inside)) == before


def test_a_sync_with_nothing_to_copy_takes_no_lease(saved, run_copy, capsys):
    """Comparing a mirror that is up to date writes nothing: it needs no writer lease
    (a run may hold it; the destination may be read-only)."""
    with ckptstore.CheckpointManager(run_copy, keep=ckptstore.KeepLast(10)):
        code, out, err = run_main(capsys, "sync", saved[0], run_copy)
    assert code == 0 and "0 copied" in out, out + err


def test_verify_of_a_root_whose_listed_checkpoints_are_all_deleted_lists_it_again(
    run_copy, capsys, monkeypatch
):
    """A re-test found it: beside a run that saves every 2 steps and keeps few, every
    checkpoint verify listed was deleted before it read them (importing torch takes
    ~1.6 s), and it said "no checkpoint left to check", exit 0, having checked nothing.
    Now it lists the root again and checks what was saved since."""
    from ckptstore.cli import verify as verify_cli

    real = verify_cli.root_targets
    listed: list[list[str]] = []

    def busy_run(backend, target):
        found = real(backend, target)
        listed.append([n for n, _ in found[0]])
        if len(listed) == 1:  # the run deletes all of them, and saves a newer one
            for name in listed[0]:
                shutil.rmtree(os.path.join(run_copy, name))
            ckptstore.Checkpointer(run_copy).save({"w": torch.ones(3)}, 50)
        return found

    monkeypatch.setattr(verify_cli, "root_targets", busy_run)
    code, out, _ = run_main(capsys, "verify", run_copy)
    assert code == 0, out
    assert listed == [["step_00000010", "step_00000020", "step_00000030", "step_00000040"],
                      ["step_00000050"]], listed  # fmt: skip
    assert "OK   step_00000050" in out and "all 1 checkpoint(s) intact" in out, out
    assert "note: step_00000010: deleted while it was being checked" in out, out
    # a root emptied for good: listed RELISTS times, then said so
    listed.clear()

    def emptied(backend, target):
        found = real(backend, target)
        listed.append([n for n, _ in found[0]])
        for name in listed[-1]:
            shutil.rmtree(os.path.join(run_copy, name))
        if len(listed) < verify_cli.RELISTS:
            ckptstore.Checkpointer(run_copy).save({"w": torch.ones(3)}, 60 + len(listed))
        return found

    monkeypatch.setattr(verify_cli, "root_targets", emptied)
    code, out, _ = run_main(capsys, "verify", run_copy)
    assert code == 0 and len(listed) == verify_cli.RELISTS, (listed, out)
    assert "no checkpoint left to check: every one was deleted while verify ran" in out, out


@pytest.mark.parametrize("what", ["manifest.json", ".metadata", "__0_0.distcp"])
def test_verify_reports_damage_without_the_advice_to_run_verify(run_copy, capsys, what):
    """Errors reading a checkpoint end with advice to run verify; verify's own report
    drops it, for every file a checkpoint has (the hints are one text each, in
    errors.py, which verify strips)."""
    path = os.path.join(run_copy, "step_00000020", what)
    if what == "manifest.json":
        with open(path, "r+b") as f:
            f.write(b"{{")  # not JSON
    else:
        os.truncate(path, os.path.getsize(path) - 7)
    code, out, _ = run_main(capsys, "verify", run_copy)
    assert code == 1 and "BAD  step_00000020" in out, out
    assert "ckptstore verify" not in out and "Checkpointer.verify" not in out, out
    code, out, _ = run_main(capsys, "verify", run_copy, "--json")
    assert code == 1 and "ckptstore verify" not in out, out


def test_verify_of_one_damaged_checkpoint_does_not_say_none_is_intact(run_copy, capsys):
    flip_byte(os.path.join(run_copy, "step_00000030", "__0_0.distcp"), 100)
    code, out, _ = run_main(capsys, "verify", os.path.join(run_copy, "step_00000030"))
    assert code == 1 and "Load or resume from an intact one" in out, out
    for name in ("step_00000010", "step_00000020", "step_00000040"):
        flip_byte(os.path.join(run_copy, name, "__0_0.distcp"), 100)
    code, out, _ = run_main(capsys, "verify", run_copy)
    assert code == 1 and "None is intact" in out, out


def test_verify_of_a_root_does_not_call_a_checkpoint_deleted_meanwhile_damaged(
    run_copy, capsys, monkeypatch
):
    """A run's retention (or a prune) deletes checkpoints while verify reads the root:
    one gone before verify reads it is noted, not reported damaged, and does not fail
    the exit status; damage elsewhere still does."""
    from ckptstore.engine import ops

    real_verify = ops.verify

    def deleted_first(backend, name, *args, **kwargs):
        if name == "step_00000020":  # as retention does: renamed away, then removed
            shutil.rmtree(os.path.join(run_copy, name))
        return real_verify(backend, name, *args, **kwargs)

    monkeypatch.setattr(ops, "verify", deleted_first)
    code, out, _ = run_main(capsys, "verify", run_copy)
    assert code == 0, out
    assert "note: step_00000020: deleted while it was being checked, not counted" in out, out
    assert "BAD" not in out and "checkpoint(s) intact" in out, out
    # set aside as damaged by a run while verify read it: damaged, not "deleted"
    from ckptstore.layout import damaged_name

    def set_aside_first(backend, name, *args, **kwargs):
        if name == "step_00000040":
            flip_byte(os.path.join(run_copy, name, "__0_0.distcp"), 100)
            os.rename(os.path.join(run_copy, name), os.path.join(run_copy, damaged_name(name, 0)))
        return real_verify(backend, name, *args, **kwargs)

    monkeypatch.setattr(ops, "verify", set_aside_first)
    code, out, _ = run_main(capsys, "verify", run_copy, "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"], out
    (bad,) = [c for c in report["checkpoints"] if not c["ok"]]
    assert bad["name"] == "step_00000040", out
    assert "(damaged) while it was being checked" in bad["problems"][-1], out
    assert not any("verify ROOT" in p for p in bad["problems"]), out
    os.rename(os.path.join(run_copy, damaged_name("step_00000040", 0)), os.path.join(run_copy, "x"))
    monkeypatch.setattr(ops, "verify", real_verify)
    # a deletion that died after its rename: named as ls --all names it
    os.rename(os.path.join(run_copy, "step_00000010"), os.path.join(run_copy, ".tmp-deleted-x"))
    flip_byte(os.path.join(run_copy, "step_00000030", "__0_0.distcp"), 100)
    code, out, _ = run_main(capsys, "verify", run_copy)
    assert code == 1 and "BAD  step_00000030" in out, out
    assert "note: .tmp-deleted-x: a deletion in progress, or a dead one" in out, out


def test_ls_of_a_root_whose_checkpoints_are_all_damaged_names_them(run_copy, capsys):
    """Review: with nothing committed left, ls said only "no committed checkpoints"."""
    for step in (10, 20, 30, 40):
        with open(os.path.join(run_copy, f"step_000000{step}", "manifest.json"), "w") as f:
            f.write("garbage")
    code, out, _ = run_main(capsys, "ls", run_copy)
    assert code == 0 and "no committed checkpoints under" in out
    names = "step_00000010, step_00000020, step_00000030, step_00000040"
    assert f"note: {names}: manifest damaged or unreadable, not listed" in out, out


def test_ls_names_a_copy_under_another_steps_name_as_such(run_copy, capsys):
    """Review: a link under another step's name is not a damaged manifest."""
    os.symlink("step_00000040", os.path.join(run_copy, "step_00000090"))
    code, out, _ = run_main(capsys, "ls", run_copy)
    assert code == 0
    assert "note: step_00000090: its manifest names another step (a copy or a link)" in out, out
    code, out, _ = run_main(capsys, "ls", run_copy, "--json")  # (scripts learn it too)
    assert code == 0 and json.loads(out)["not_listed"] == [
        {"name": "step_00000090", "why": "its manifest names another step (a copy or a link)"}
    ]
    code, out, _ = run_main(capsys, "ls", run_copy, "--json", "--all")  # (listed there)
    assert code == 0 and json.loads(out)["not_listed"] == []


@pytest.mark.parametrize("fails", ["create", "write"])
def test_prune_yes_works_on_a_full_disk(run_copy, capsys, monkeypatch, fails):
    """The lease file cannot be created, or its record written (ENOSPC): prune --yes,
    what a full disk's error recommends, still frees space."""
    import errno

    from ckptstore.layout import WRITER_LEASE_FILE
    from ckptstore.manager import lease

    lease_file = os.path.join(str(run_copy), WRITER_LEASE_FILE)
    if os.path.exists(lease_file):
        os.unlink(lease_file)
    real_open = os.open

    def full_open(path, *args, **kwargs):
        if fails == "create" and str(path).endswith(WRITER_LEASE_FILE):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_open(path, *args, **kwargs)

    def full_pwrite(fd, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lease.os, "open", full_open)
    if fails == "write":
        monkeypatch.setattr(lease.os, "pwrite", full_pwrite)
    code, out, err = run_main(capsys, "prune", run_copy, "--keep-last", "1", "--yes")
    assert code == 0 and "deleted 3 checkpoint(s)" in out, out + err


# ---- S3: sync / pull and every command on an s3:// root -----------------------------
def test_pull_of_a_damaged_remote_names_the_remote_file(run_copy, s3_server, s3_bucket, tmp_path):
    remote = f"s3://{s3_bucket}/runs/exp"
    assert cli("sync", run_copy, remote, "--step", "10").returncode == 0
    fs = s3_server.fs()
    [key] = [k for k in fs.find(f"{s3_bucket}/runs/exp/step_00000010") if k.endswith(".distcp")]
    data = bytearray(fs.cat_file(key))
    data[len(data) // 3] ^= 1  # inside a chunk: found only by reading the copy through
    fs.pipe_file(key, bytes(data))
    fresh = str(tmp_path / "fresh")
    pull = cli("pull", remote, fresh)
    assert pull.returncode == 1, show(pull)
    [line] = [x for x in pull.stdout.splitlines() if x.startswith("FAILED")]
    assert f"FAILED   step_00000010: s3://{key}: " in line, line  # not the local copy's path
    assert "the source is likely damaged" in line and f"ckptstore verify {remote}`" in line
    assert not os.path.exists(os.path.join(fresh, "step_00000010"))


def test_a_copy_damaged_on_the_way_does_not_blame_a_local_source(tmp_path, capsys, monkeypatch):
    """A local source is read through before it is copied: when the copy then fails its
    check, the destination (or memory) is at fault, not the source."""
    from ckptstore import transfer

    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    with ckptstore.Checkpointer(src, codec="none") as ckpt:
        ckpt.save({"w": torch.randn(256, 1024)}, step=5)
    copy_all = transfer.CopyJob.copy_all

    def flaky(self, files, threads):  # a destination disk that flips a bit
        copy_all(self, files, threads)
        for f in os.listdir(self.pending._dir):
            if f.endswith(".distcp"):
                with open(os.path.join(self.pending._dir, f), "r+b") as fh:
                    data = bytearray(fh.read())
                    data[len(data) // 2] ^= 1
                    fh.seek(0)
                    fh.write(bytes(data))

    monkeypatch.setattr(transfer.CopyJob, "copy_all", flaky)
    code, out, _ = run_main(capsys, "sync", src, dst)
    assert code == 1
    assert "read intact just before: suspect the destination's disk" in out, out
    assert "source is likely damaged" not in out and "step_00000005" not in os.listdir(dst)


def test_sync_pull_and_commands_on_s3(saved, run_copy, s3_server, s3_bucket, tmp_path, capsys):
    _root, state = saved
    remote = f"s3://{s3_bucket}/runs/exp"
    add_leftovers(run_copy)  # never copied: uncommitted and damaged ones
    fs = s3_server.fs()
    # What an interrupted copy leaves: files under a name, no manifest. A rerun copies it.
    fs.pipe_file(f"{s3_bucket}/runs/exp/step_00000010/__0_0.distcp", b"partial")

    first = cli("sync", run_copy, remote)
    assert first.returncode == 1, show(first)  # not knowing it is dead, it leaves it alone
    assert "UNCOMMITTED step_00000010" in first.stdout and "--grace-s 0" in first.stdout
    assert "3 copied, 0 already there, 1 failed" in first.stdout
    code, out, _ = run_main(capsys, "sync", run_copy, remote, "--grace-s", "0")
    assert code == 0, out
    assert "removed  step_00000010" in out and "copied   step_00000010" in out
    fresh = str(tmp_path / "fresh")
    pull = cli("pull", remote, fresh)
    assert pull.returncode == 0, show(pull)
    assert "4 copied" in pull.stdout
    code, out, _ = run_main(capsys, "ls", remote, "--json")
    assert code == 0
    checkpoints = json.loads(out)["checkpoints"]
    assert [c["name"] for c in checkpoints] == [f"step_000000{s}0" for s in (1, 2, 3, 4)]
    assert checkpoints[-1]["tags"] == ["latest", "final"]  # pointers travel too
    there = {n.rsplit("/", 1)[-1] for n in fs.ls(f"{s3_bucket}/runs/exp")}
    assert there == {f"step_000000{s}0" for s in (1, 2, 3, 4)} | {"latest"}
    code, out, _ = run_main(capsys, "sync", run_copy, remote)  # again: nothing to copy
    assert code == 0 and "0 copied, 4 already there" in out
    code, out, _ = run_main(capsys, "ls", fresh, "--remote", remote, "--json")
    assert all("backed-up" in c["tags"] for c in json.loads(out)["checkpoints"])
    code, out, _ = run_main(capsys, "verify", fresh)
    assert code == 0 and "all 4 checkpoint(s) intact" in out
    code, _, _ = run_main(capsys, "export", fresh, tmp_path / "pulled.pt")
    assert code == 0
    assert_same(state, torch.load(tmp_path / "pulled.pt", weights_only=True))

    # A damaged copy at the destination: reported, left alone, replaced only when asked.
    key = f"{s3_bucket}/runs/exp/step_00000020/__0_0.distcp"
    fs.pipe_file(key, fs.cat_file(key)[:-10])
    code, out, _ = run_main(capsys, "sync", run_copy, remote)
    assert code == 1 and "DAMAGED  step_00000020" in out and "--replace-damaged" in out
    code, out, _ = run_main(capsys, "verify", remote, "--json")
    assert code == 1
    bad = [c for c in json.loads(out)["checkpoints"] if not c["ok"]]
    assert [c["name"] for c in bad] == ["step_00000020"] and "__0_0.distcp" in bad[0]["problems"][0]
    code, out, _ = run_main(capsys, "sync", run_copy, remote, "--replace-damaged")
    assert code == 0 and "replaced step_00000020" in out
    assert "0 copied, 1 replaced, 3 already there, 0 failed" in out, out
    code, out, _ = run_main(capsys, "verify", f"{remote}/step_00000020")
    assert code == 0 and "intact" in out

    # info / export / import / prune / gc on the bucket.
    code, out, _ = run_main(capsys, "info", f"{remote}/step_00000020", "--json")
    assert code == 0 and json.loads(out)["metrics"] == {"val_loss": 2.5}
    code, _, _ = run_main(
        capsys,
        "export",
        remote,
        "--step",
        "20",
        f"s3://{s3_bucket}/out/m{ST}",
        "--only",
        "model",
    )
    assert code == 0
    fs.get_file(f"{s3_bucket}/out/m{ST}", str(tmp_path / f"m{ST}"))
    assert_same(state["model"], load_export(tmp_path / f"m{ST}"))
    code, out, _ = run_main(capsys, "import", tmp_path / f"m{ST}", remote, "--step", "50")
    assert code == 0 and f"{remote}/step_00000050" in out
    code, out, _ = run_main(capsys, "prune", remote, "--keep-last", "2")
    assert code == 0 and "would delete 3 checkpoint(s)" in out

    fs.pipe_file(f"{s3_bucket}/runs/exp/step_00000090/__0_0.distcp", b"dead save")
    s3_server.call("create_multipart_upload", Bucket=s3_bucket, Key="runs/exp/step_00000091/x")
    code, out, _ = run_main(capsys, "ls", remote, "--all", "--json")
    status = {c["name"]: c["status"] for c in json.loads(out)["checkpoints"]}
    assert status["step_00000090"] == "uncommitted"
    code, out, _ = run_main(capsys, "gc", remote, "--grace-s", "0", "--json")
    assert code == 0
    removed = json.loads(out)["removed"]
    assert "step_00000090" in removed
    assert any("multipart upload of runs/exp/step_00000091/x" in r for r in removed)
    assert s3_server.open_uploads(s3_bucket) == []
    code, out, _ = run_main(capsys, "ls", remote)
    assert "step_00000050" in out and "step_00000090" not in out


def test_s3_usage_errors(s3_server, capsys):
    code, _, err = run_main(capsys, "ls", "s3://no-such-bucket-for-ckptstore/runs")
    assert code == 2 and "does not exist" in err and "create it first" in err


def test_safetensors_is_installed():
    """The .safetensors cases above fall back to .pt without it: say so in the report."""
    pytest.importorskip(
        "safetensors", reason="safetensors is not installed: .safetensors export/import untested"
    )


def test_an_unknown_flag_is_said_by_the_command_it_was_given_to(tmp_path, capsys):
    """`ckptstore ls ROOT --wrong` printed the top-level usage ("ckptstore: error ... see
    ckptstore --help"), which lists commands, not ls's flags."""
    assert main(["ls", str(tmp_path), "--wrong"]) == 2
    err = capsys.readouterr().err
    assert "usage: ckptstore ls" in err, err
    assert err.strip().endswith(
        "ckptstore ls: error: unrecognized arguments: --wrong (see ckptstore ls --help)"
    ), err
