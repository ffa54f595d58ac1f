"""Starting up is cheap: ``import ckptstore``, ``ckptstore --help``, ``--version``, usage
errors and ``ckptstore ls`` of a local root import no torch (issue 15). What is checked is
which modules a fresh interpreter imports (``-X importtime``), never how long it takes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from helpers import REPO, run_python

import ckptstore

# Modules that must import without torch (the command line's own, and what it shares).
# ckptstore.cli.export is not among them: its --dtype choices are torch dtypes.
LIGHT = [
    "ckptstore",
    "ckptstore.errors",
    "ckptstore.units",
    "ckptstore.version",
    "ckptstore.cli",
    "ckptstore.cli.main",
    "ckptstore.cli._common",
    "ckptstore.cli.ls",
    "ckptstore.engine.listing",
    "ckptstore.manager.policies",
]


def imported(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """``python -X importtime -m ckptstore ARGS``: the process, and every module it imported."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ckptstore", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
        check=False,
    )
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }
    assert "ckptstore.cli.main" in modules, proc.stderr[-2000:]  # importtime did report
    return proc, modules


@pytest.mark.parametrize("module", LIGHT)
def test_module_imports_without_torch(module: str) -> None:
    proc = run_python(
        f"""
        import importlib, sys
        importlib.import_module({module!r})
        assert "torch" not in sys.modules, "importing {module} imported torch"
        print("OK")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK"


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--help"], 0),
        (["--version"], 0),
        ([], 2),  # the help, as a usage error
        (["lss", "runs/x"], 2),  # a mistyped command
        (["ls"], 2),  # a missing argument
        (["verify"], 2),  # a command's own usage error
        (["sync", "runs/x"], 2),
        *(([c, "--help"], 0) for c in ("ls", "info", "verify", "import", "prune", "sync")),
        *(([c, "--help"], 0) for c in ("pull", "gc", "quarantine")),
    ],
)
def test_help_version_and_usage_errors_import_no_torch(args: list[str], code: int) -> None:
    proc, modules = imported(*args)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "torch" not in modules
    assert "numpy" not in modules  # the codecs and shard files are not needed to parse
    if args == ["--version"]:
        assert proc.stdout.strip() == f"ckptstore {ckptstore.__version__}"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Three checkpoints through the manager (tags latest, best, final), and a leftover
    that is not one (a step directory without a manifest)."""
    root = str(tmp_path_factory.mktemp("startup") / "run")
    with ckptstore.CheckpointManager(root, codec="zstd") as mgr:
        for i, loss in enumerate([3.0, 2.0, 2.5]):
            mgr.save(
                10 * (i + 1) - 1,
                {"w": torch.arange(1000, dtype=torch.float32) * i, "step": i},
                metrics={"val_loss": loss},
                reason="final" if i == 2 else "interval",
            )
        mgr.wait()
    os.makedirs(os.path.join(root, "step_00000040"))
    return root


@pytest.mark.parametrize("extra", [[], ["--all"], ["--json"]])
def test_ls_of_a_local_root_imports_no_torch(root: str, extra: list[str]) -> None:
    proc, modules = imported("ls", root, *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch" not in modules
    assert "ckptstore.engine.ops" not in modules  # the listing path stays apart from DCP
    if extra == ["--json"]:
        rows: Any = json.loads(proc.stdout)
        assert rows, proc.stdout
    else:
        for name in ("step_00000010", "step_00000020", "step_00000030"):
            assert name in proc.stdout


def test_every_public_name_resolves_lazily() -> None:
    proc = run_python(
        """
        import sys
        import ckptstore
        assert "torch" not in sys.modules
        names = list(ckptstore.__all__)
        assert set(names) <= set(dir(ckptstore))
        for name in names:
            assert getattr(ckptstore, name) is not None, name
        assert "torch" in sys.modules  # the engine's names did need it
        try:
            ckptstore.no_such_name
        except AttributeError as exc:
            assert "no_such_name" in str(exc)
        else:
            raise AssertionError("ckptstore.no_such_name did not raise AttributeError")

        star = {}
        exec("from ckptstore import *", star)
        assert set(names) <= set(star), set(names) - set(star)
        for name in names:
            assert star[name] is getattr(ckptstore, name), name

        from ckptstore.engine.ops import CheckpointInfo, list_checkpoints
        from ckptstore.manager.manager import CheckpointManager
        assert ckptstore.CheckpointInfo is CheckpointInfo
        assert ckptstore.CheckpointManager is CheckpointManager
        assert list_checkpoints.__module__ == "ckptstore.engine.listing"
        print("OK")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK"


def test_from_import_of_each_name_in_a_fresh_interpreter() -> None:
    """``from ckptstore import X`` as the first use of X, for every X."""
    lines = "\n".join(f"from ckptstore import {name}" for name in ckptstore.__all__)
    proc = run_python(lines + "\nprint('OK')\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK"
