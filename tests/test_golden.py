"""Golden checkpoints: what every format version wrote still loads, bit-exact.

``tests/golden/vN/`` holds tiny checkpoints written by ckptstore at format version N
(``tests/golden/make_golden.py`` explains how they were made and when to add a folder).
Each one is copied to a temporary directory (nothing a load or a start-up sweep does can
touch the committed files; a fixture checks they are unchanged) and loaded into a fresh,
zeroed target; the expected contents are rebuilt by the generator's own code, whose
digest ``vN/cases.json`` pins.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
from typing import Any

import pytest
import torch
from helpers import assert_same, blank_like

import ckptstore
from ckptstore.config import MANIFEST_KEY_ENV
from ckptstore.format.manifest import FORMAT_VERSION

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


def _import_generator() -> Any:
    spec = importlib.util.spec_from_file_location(
        "make_golden", os.path.join(GOLDEN, "make_golden.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _import_generator()
VERSIONS = sorted(
    (n for n in os.listdir(GOLDEN) if re.fullmatch(r"v\d+", n)), key=lambda n: int(n[1:])
)


def cases_of(version: str) -> dict[str, dict[str, Any]]:
    with open(os.path.join(GOLDEN, version, "cases.json")) as f:
        return dict(json.load(f))


ALL = [(v, name) for v in VERSIONS for name in sorted(cases_of(v))]
SIGNED = [(v, name) for v, name in ALL if cases_of(v)[name]["signed"]]


def _snapshot(top: str) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, files in os.walk(top):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for n in files:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, top)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module", autouse=True)
def _golden_files_untouched():
    before = _snapshot(GOLDEN)
    yield
    assert _snapshot(GOLDEN) == before, "a test changed, added or removed a golden file"


@pytest.fixture(autouse=True)
def _no_key_from_the_environment(monkeypatch):
    monkeypatch.delenv(MANIFEST_KEY_ENV, raising=False)


def copy_of(tmp_path, version: str, name: str) -> str:
    """A copy of one golden checkpoint root to load from."""
    root = str(tmp_path / version / name)
    shutil.copytree(os.path.join(GOLDEN, version, name), root)
    return root


def expected(case: dict[str, Any]) -> dict[str, Any]:
    state = gen.full_state(case["world"])
    assert gen.digest(state) == case["sha256"], (
        "make_golden.full_state() no longer builds what the golden checkpoints were written "
        "from: restore it (add new contents only with a new format version)"
    )
    return state


def assert_loaded(want: Any, got: Any, path: str = "") -> None:
    """torch.equal and dtype on every tensor, == on every value, then byte for byte."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), path
        assert got.dtype == want.dtype, f"{path}: {got.dtype} != {want.dtype}"
        assert torch.equal(got, want), f"{path} differs"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), path
        for k in want:
            assert_loaded(want[k], got[k], f"{path}.{k}")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"
    if not path:
        assert_same(want, got)  # also -0.0 vs 0.0, and the exact type of every value


def test_the_current_format_version_has_golden_checkpoints():
    assert f"v{FORMAT_VERSION}" in VERSIONS, (
        f"FORMAT_VERSION is {FORMAT_VERSION} and tests/golden/v{FORMAT_VERSION}/ does not "
        "exist: run python tests/golden/make_golden.py (and keep the older folders)"
    )
    assert set(cases_of(f"v{FORMAT_VERSION}")) == set(gen.CASES)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_golden_folder_is_a_listed_case(version):
    folders = {n for n in os.listdir(os.path.join(GOLDEN, version)) if n != "cases.json"}
    assert folders == set(cases_of(version))


@pytest.mark.parametrize(("version", "name"), ALL, ids=[f"{v}/{n}" for v, n in ALL])
def test_golden_checkpoint_verifies_and_loads_bit_exact(tmp_path, version, name):
    case = cases_of(version)[name]
    want = expected(case)
    root = copy_of(tmp_path, version, name)
    key = gen.KEY if case["signed"] else None
    with ckptstore.Checkpointer(root, manifest_key=key) as ckpt:
        assert [i.step for i in ckpt.list()] == [case["step"]]
        manifest = ckpt.latest().manifest
        assert manifest.format_version == int(version[1:])
        assert manifest.world_size == case["world"]
        assert manifest.codec["id"] == case["codec"]
        assert manifest.metadata == case["metadata"]
        assert ckpt.verify(case["step"]) == []
        target = blank_like(want)
        with pytest.raises(AssertionError):
            assert_loaded(want, target)  # the target really starts out different
        info = ckpt.load(target, case["step"])
    assert info.step == case["step"]
    assert_loaded(want, target)


@pytest.mark.parametrize(("version", "name"), ALL, ids=[f"{v}/{n}" for v, n in ALL])
def test_golden_checkpoint_loads_by_path(tmp_path, version, name):
    """The one-shot API (``ckptstore.load`` of one checkpoint directory) reads it too."""
    case = cases_of(version)[name]
    want = expected(case)
    root = copy_of(tmp_path, version, name)
    target = blank_like(want)
    ckptstore.load(target, os.path.join(root, f"step_{case['step']:08d}"))
    assert_loaded(want, target)


@pytest.mark.parametrize(("version", "name"), SIGNED, ids=[f"{v}/{n}" for v, n in SIGNED])
def test_signed_golden_checkpoint_needs_the_right_key(tmp_path, version, name):
    case = cases_of(version)[name]
    want = expected(case)
    root = copy_of(tmp_path, version, name)
    step = case["step"]
    with ckptstore.Checkpointer(root, manifest_key=b"not the golden key") as ckpt:
        with pytest.raises(ckptstore.UnsafeCheckpointError):
            ckpt.load(blank_like(want), step)
        assert ckpt.verify(step) != []
        assert ckpt.list() == []
    # The right key; and no key, since a reader without one ignores the signature.
    for key in (gen.KEY, None):
        with ckptstore.Checkpointer(root, manifest_key=key) as ckpt:
            target = blank_like(want)
            ckpt.load(target, step)
        assert_loaded(want, target)
