from __future__ import annotations

import os
import threading

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow", action="store_true", help="also run tests marked slow (stress, large states)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow") or os.environ.get("CKPTSTORE_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def root(tmp_path):
    """A fresh checkpoint root on local disk."""
    return str(tmp_path / "ckpts")


@pytest.fixture(autouse=True)
def _no_leaked_threads():
    """Every test leaves no ckptstore thread running behind it."""
    yield
    leaked = [
        t.name for t in threading.enumerate() if t.name.startswith("ckptstore-") and t.is_alive()
    ]
    # Executor threads exit shortly after shutdown; give them a moment.
    for t in threading.enumerate():
        if t.name.startswith("ckptstore-"):
            t.join(timeout=5)
    leaked = [
        t.name for t in threading.enumerate() if t.name.startswith("ckptstore-") and t.is_alive()
    ]
    assert not leaked, f"threads left running: {leaked}"
