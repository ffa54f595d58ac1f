from __future__ import annotations

import os
import threading

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow", action="store_true", help="also run tests marked slow (stress, large states)"
    )


def pytest_configure(config: pytest.Config) -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:  # under pytest-xdist (`-n N`): the workers share the cores
        import torch

        from ckptstore.config import default_threads  # (the cores this process may use)

        # torch's OpenMP threads spin-wait for each other; with more of them than cores
        # each small op can wait a time slice (a property test took 45 s instead of 4 s).
        torch.set_num_threads(max(1, default_threads() // int(workers)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _skip_cuda_without_gpus(items)
    if config.getoption("--run-slow") or os.environ.get("CKPTSTORE_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _skip_cuda_without_gpus(items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` need a GPU (``cuda(gpus=2)``: two); each skip says why, so
    that ``-ra`` lists every GPU test this run did not prove."""
    cuda = [item for item in items if "cuda" in item.keywords]
    if not cuda:
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in cuda:
        need = item.get_closest_marker("cuda").kwargs.get("gpus", 1)  # type: ignore[union-attr]
        if have < need:
            why = "no CUDA device" if have == 0 else f"{have} CUDA device(s)"
            item.add_marker(pytest.mark.skip(reason=f"cuda: needs {need} GPU(s), {why} here"))


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


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server process (moto) on 127.0.0.1, for the whole session."""
    from ckptstore.storage.testing.s3server import S3Server

    server = S3Server().start()
    # Code that is given no storage_options finds the server the standard way, through
    # the AWS environment variables, as it would find AWS.
    saved = {k: os.environ.get(k) for k in server.client_env()}
    os.environ.update(server.client_env())
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the test server."""
    return s3_server.new_bucket()


@pytest.fixture(scope="session")
def forkserver():
    """A process with ckptstore imported that forks a fresh child per crash trial or
    check (``tests/crashrig.py``); stopped, with any child left, at the end."""
    from crashrig import ForkServer

    with ForkServer() as server:
        yield server
