"""Write the golden checkpoints of the current on-disk format version.

Golden checkpoints are tiny checkpoints committed to the repository, one folder per
format version (``tests/golden/v1/``, ``v2/``, ...). ``tests/test_golden.py`` loads every
one of them bit-exact, so a change that can no longer read what an older ckptstore
wrote fails a test instead of stranding users' checkpoints.

Run it from the repository root, on CPU (two ranks are two real processes on gloo)::

    python tests/golden/make_golden.py [--out DIR]

It writes ``tests/golden/v<FORMAT_VERSION>/`` (``FORMAT_VERSION`` from
``ckptstore/format/manifest.py``) and refuses if that folder exists; ``--out DIR``
writes ``DIR/v<FORMAT_VERSION>/`` instead (to compare two runs, say). Rerun it only when
``FORMAT_VERSION`` changes, to add the new version's folder next to the old ones. Never
regenerate, edit or delete an existing ``vN/`` folder: those files are what users of
that version have on disk. Do not change :func:`full_state` either: every version's
expected contents come from it, and ``vN/cases.json`` pins its digest.

Each case is a checkpoint root holding one numbered checkpoint (``step_00000007``):

* ``r1-none``, ``r1-zstd``: saved by one process, codec ``none`` / ``zstd``;
* ``r2-none``, ``r2-zstd``: saved by two ranks (gloo, CPU), the model as DTensors
  (rows, columns and replicated) and one tensor per rank under its own key;
* ``r1-zstd-signed``: one process, zstd, manifest signed with :data:`KEY`.

The tensors come from integer arithmetic (no RNG, no libm), so the expected contents are
the same on every machine and torch version. ``vN/cases.json`` records, per case, how it
was saved and a sha256 of the expected contents. A rerun writes the same shard files,
byte for byte; ``.metadata`` differs in DCP's random ``save_id`` and ``manifest.json`` in
``created_unix_s``, ``versions`` and the checksums that cover those.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

import torch

GOLDEN = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(GOLDEN))
KEY = b"ckptstore-golden-manifest-key"  # signs r1-zstd-signed; not a secret
STEP = 7
CHUNK_BYTES = 4096  # the smallest allowed: "embed" (4.3 KiB) spans two chunks
METADATA = {"note": "golden", "epoch": 2}
CASES: dict[str, dict[str, Any]] = {
    "r1-none": {"world": 1, "codec": "none", "signed": False},
    "r1-zstd": {"world": 1, "codec": "zstd", "signed": False},
    "r2-none": {"world": 2, "codec": "none", "signed": False},
    "r2-zstd": {"world": 2, "codec": "zstd", "signed": False},
    "r1-zstd-signed": {"world": 1, "codec": "zstd", "signed": True},
}


# ---- the contents: never change these (the digests in every vN/cases.json pin them) ----


def _ints(n: int, seed: int) -> list[int]:
    """``n`` 64-bit values of an LCG (Knuth's MMIX constants) seeded with ``seed``."""
    x, out = seed, []
    for _ in range(n):
        x = (6364136223846793005 * x + 1442695040888963407) % (1 << 64)
        out.append(x)
    return out


def _floats(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """fp32 in [-8, 8) with 24 significant bits: exact, whatever the platform."""
    n = 1
    for d in shape:
        n *= d
    vals = [((x >> 40) - (1 << 23)) / (1 << 20) for x in _ints(n, seed)]
    return torch.tensor(vals, dtype=torch.float32).reshape(shape)


def _int_tensor(n: int, seed: int, shift: int, offset: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([(x >> shift) - offset for x in _ints(n, seed)], dtype=dtype)


def full_state(world: int) -> dict[str, Any]:
    """What a checkpoint saved by ``world`` ranks holds, as one process loads it."""
    return {
        "model": {
            "layers": {
                "0": {"weight": _floats((16, 8), 1), "bias": _floats((8,), 2)},
                "1": {"weight": _floats((8, 6), 3).bfloat16()},
            },
            "embed": _floats((1100,), 4),  # 4400 B: two chunks (4096 + 304 B)
        },
        "optim": {
            "state": {
                0: {"step": torch.tensor(3.0), "exp_avg": _floats((8,), 5)},
                1: {"step": torch.tensor(3.0), "exp_avg": _floats((8, 6), 6).half()},
            },
            "param_groups": [{"lr": 0.00025, "params": [0, 1]}],
        },
        "buffers": {
            "counts": _int_tensor(40, 7, 16, 1 << 47, torch.int64),  # up to +-2**47
            "mask": _int_tensor(37, 8, 63, 0, torch.bool),
            "i8": _int_tensor(33, 9, 56, 128, torch.int8),
            "u8": _int_tensor(33, 10, 56, 0, torch.uint8),
            "special": torch.tensor(
                [0.0, -0.0, float("inf"), float("-inf"), 1e-45, 3.4e38, -2.5, 1.0]
            ),
            "scalar": torch.tensor(123456789012, dtype=torch.int64),
            "empty": torch.empty(0, 3),
        },
        "per_rank": {f"rank{r}": _int_tensor(5, 100 + r, 40, 0, torch.int64) for r in range(world)},
        "step": STEP,
        "name": "golden",
        "flags": [True, False, None],
        "nested": {"a": {"b": [1, 2.5, "x", (3, 4)]}, "empty": {}},
    }


def digest(state: Any) -> str:
    """sha256 over the keys, dtypes, shapes and bytes of every tensor and the repr of
    every other value, in order."""
    h = hashlib.sha256()

    def walk(x: Any, path: str) -> None:
        if isinstance(x, dict):
            for k in sorted(x, key=repr):
                walk(x[k], f"{path}/{k!r}")
        elif isinstance(x, torch.Tensor):
            t = x.contiguous().reshape(-1)
            h.update(f"{path}:{x.dtype}{list(x.shape)}:".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(f"{path}={x!r};".encode())

    walk(state, "")
    return h.hexdigest()


# ---- saving ------------------------------------------------------------------------------


def rank_state(rank: int, world: int) -> dict[str, Any]:
    """What rank ``rank`` of ``world`` saves: with 2 ranks the model is DTensors (rows,
    columns, replicated, rows) and each rank saves only its own ``per_rank`` entry."""
    state = full_state(world)
    state["per_rank"] = {f"rank{rank}": state["per_rank"][f"rank{rank}"]}
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        model = state["model"]
        layers = model["layers"]
        layers["0"]["weight"] = distribute_tensor(layers["0"]["weight"], mesh, [Shard(0)])
        layers["0"]["bias"] = distribute_tensor(layers["0"]["bias"], mesh, [Replicate()])
        layers["1"]["weight"] = distribute_tensor(layers["1"]["weight"], mesh, [Shard(1)])
        model["embed"] = distribute_tensor(model["embed"], mesh, [Shard(0)])
    return state


def save_case(root: str, case: dict[str, Any], rank: int) -> None:
    import ckptstore

    with ckptstore.Checkpointer(
        root,
        codec=case["codec"],
        chunk_bytes=CHUNK_BYTES,
        threads=1,
        manifest_key=KEY if case["signed"] else None,
    ) as ckpt:
        ckpt.save(rank_state(rank, case["world"]), STEP, metadata=METADATA)


def _rank_main(root: str, name: str, rank: int, world: int, store: str) -> None:
    """One rank of a multi-rank case (this script run again, once per rank)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        save_case(root, CASES[name], rank)
    finally:
        dist.barrier()
        dist.destroy_process_group()
    print(f"OK rank {rank}", flush=True)
    sys.stdout.flush()
    # gloo after DeviceMesh collectives sometimes aborts in interpreter teardown (see
    # tests/dist_worker.py): the work is done, skip the teardown.
    os._exit(0)


def _save_ranks(root: str, name: str, world: int, tmp: str) -> None:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("CKPTSTORE_MANIFEST_KEY", None)
    store = os.path.join(tmp, f"store-{name}")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--rank", root, name, str(r), str(world), store],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs, strict=True)):
        if p.returncode != 0 or f"OK rank {r}" not in out:
            raise SystemExit(f"{name}: rank {r} exited {p.returncode}:\n{out}")


def main(argv: list[str]) -> None:
    sys.path.insert(0, REPO)
    os.environ.pop("CKPTSTORE_MANIFEST_KEY", None)
    from ckptstore.format.manifest import FORMAT_VERSION

    top = argv[1] if argv[:1] == ["--out"] and len(argv) == 2 else GOLDEN
    if argv and top == GOLDEN:
        raise SystemExit(f"usage: {sys.argv[0]} [--out DIR]")
    out = os.path.join(top, f"v{FORMAT_VERSION}")
    if os.path.exists(out):
        raise SystemExit(f"{out} exists: golden checkpoints of a version are never rewritten")
    with tempfile.TemporaryDirectory() as tmp:
        staging = os.path.join(tmp, f"v{FORMAT_VERSION}")
        os.makedirs(staging)
        cases = {}
        for name, case in CASES.items():
            root = os.path.join(staging, name)
            if case["world"] == 1:
                save_case(root, case, 0)
            else:
                _save_ranks(root, name, case["world"], tmp)
            cases[name] = {
                **case,
                "step": STEP,
                "metadata": METADATA,
                "sha256": digest(full_state(case["world"])),
            }
        with open(os.path.join(staging, "cases.json"), "w") as f:
            json.dump(cases, f, indent=2, sort_keys=True)
            f.write("\n")
        shutil.copytree(staging, out)
    for dirpath, _, files in sorted(os.walk(out)):
        for n in sorted(files):
            p = os.path.join(dirpath, n)
            print(f"{os.path.getsize(p):8d}  {p}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank"]:
        _root, _name, _rank, _world, _store = sys.argv[2:7]
        _rank_main(_root, _name, int(_rank), int(_world), _store)
    else:
        main(sys.argv[1:])
