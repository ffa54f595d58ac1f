"""The package's shape: imports point downward only, no private name crosses a module
boundary, no module grows past ~550 lines, and every raised class lives in errors.py.

Layers, bottom up (a module may import its own unit and anything below it)::

    foundation     errors, layout, version, units, crashpoints
    progress       progress.py (progress lines, in units' bytes)
    storage        storage/
    codecs         codecs/
    format         format/
    dcp            dcp/
    config         config.py
    engine         engine/
    linking        linking.py (what a copy's destination already holds; checked first)
    transfer       transfer.py, convert.py
    transfer_parts transfer_parts.py (node-local backups, part by part; uses transfer)
    interop        interop.py (plain DCP directories; uses convert)
    manager        manager/
    integrations   integrations/
    faces          cli/, train/, bench/, demo.py, __main__.py, and the package itself
                   (the faces may use each other and the public API)
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ckptstore"
MAX_LINES = 550

LAYERS = [
    ("foundation", ["errors", "layout", "version", "units", "crashpoints"]),
    ("progress", ["progress"]),
    ("storage", ["storage"]),
    ("codecs", ["codecs"]),
    ("format", ["format"]),
    ("dcp", ["dcp"]),
    ("config", ["config"]),
    ("engine", ["engine"]),
    ("linking", ["linking"]),  # what a copy's destination holds: used by transfer
    ("transfer", ["transfer", "convert"]),
    ("transfer_parts", ["transfer_parts"]),  # node-local backups: uses transfer
    ("interop", ["interop"]),  # plain DCP directories: uses convert
    ("manager", ["manager"]),
    ("integrations", ["integrations"]),
    ("faces", ["cli", "train", "bench", "demo", "__main__", "__init__"]),
]
RANK = {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}


def modules() -> list[pathlib.Path]:
    return sorted(PACKAGE.rglob("*.py"))


def dotted(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The top-level room a dotted name lives in: ckptstore.engine.ops -> engine."""
    parts = module.split(".")
    if len(parts) == 1:  # the package itself
        return "__init__"
    return parts[1]


def imports(path: pathlib.Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) for every ckptstore import, nested ones included."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ckptstore":
                    found.append((node.lineno, alias.name, []))
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] == "ckptstore"
        ):
            found.append((node.lineno, node.module, [a.name for a in node.names]))
    return found


def test_every_module_belongs_to_a_layer():
    for path in modules():
        assert unit(dotted(path)) in RANK, f"{dotted(path)}: add its room to LAYERS"


def test_imports_point_downward_only():
    bad = []
    for path in modules():
        me = dotted(path)
        mine = unit(me)
        for line, target, _names in imports(path):
            theirs = unit(target)
            if theirs == mine:
                continue
            faces = LAYERS[RANK[mine]][0] == "faces"
            if RANK[theirs] > RANK[mine] or (RANK[theirs] == RANK[mine] and not faces):
                bad.append(f"{me}:{line} imports {target} ({theirs} is not below {mine})")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_no_private_name_crosses_a_module_boundary():
    bad = []
    for path in modules():
        me = dotted(path)
        package = me if path.name == "__init__.py" else me.rpartition(".")[0]
        for line, target, names in imports(path):
            private_module = [p for p in target.split(".") if p.startswith("_")]
            if private_module and not target.startswith(package + "."):
                bad.append(f"{me}:{line} imports the private module {target}")
            for name in names:
                if name.startswith("_") and name != "__version__":
                    inside = target.startswith(package + ".") or target == package
                    # a private module of the same package may be imported by name
                    module_file = PACKAGE.parent.joinpath(*target.split("."), f"{name}.py")
                    if not (inside and module_file.exists()):
                        bad.append(f"{me}:{line} imports the private name {target}.{name}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_too_long(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {n} lines; split it at a seam"


def test_every_exception_class_lives_in_errors_and_is_drawn_in_its_tree():
    errors_py = PACKAGE / "errors.py"
    drawn = ast.get_docstring(ast.parse(errors_py.read_text())) or ""
    elsewhere = []
    for path in modules():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
            is_error = node.name.endswith("Error") or bases & {"Exception", "BaseException"}
            if not is_error:
                continue
            if path != errors_py:
                elsewhere.append(f"{dotted(path)}.{node.name}")
            else:
                assert node.name in drawn, f"{node.name} is missing from the tree in errors.py"
    assert not elsewhere, f"exception classes outside ckptstore/errors.py: {elsewhere}"
