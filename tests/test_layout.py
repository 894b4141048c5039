"""
The package's shape, as CONTRIBUTING.md's layout map describes it: each
subpackage imports only those below it, and another subpackage only through
its public face; no module is much over 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "apicontainer"

# Lowest first: a subpackage may import the top-level modules and those
# before it here, never one after it.
LAYERS = ["storage", "config", "stashes", "pipeline", "web", "server", "testing"]
MAX_LINES = 450


def _imports(path: Path, top: Path) -> list[tuple[str, int]]:
    """
    The absolute names of the modules of the package C{top} that C{path}
    imports from at run time, with their lines: the imports under C{if
    TYPE_CHECKING:} are for annotations only, and left out.
    """
    package = list(path.relative_to(top.parent).parts[:-1])
    tree = ast.parse(path.read_text())
    typing = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in typing:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] == top.name:
                found.append((name, node.lineno))
    return found


def _layer(parts: list[str] | tuple[str, ...]) -> str | None:
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def violations(top: Path) -> list[str]:
    """
    Every import between subpackages of C{top} that goes up the layers, or
    past the other subpackage's face to one of its private modules.
    """
    wrong = []
    for path in sorted(top.rglob("*.py")):
        mine = _layer(path.relative_to(top.parent).parts)
        for name, line in _imports(path, top):
            parts = name.split(".")
            theirs = _layer(parts)
            if theirs is None or theirs == mine:
                continue
            where = f"{path.relative_to(top.parent)}:{line} imports {name}"
            if mine is None:
                wrong.append(f"{where}: a top-level module imports a subpackage")
            elif LAYERS.index(theirs) > LAYERS.index(mine):
                wrong.append(f"{where}: {theirs} is above {mine}")
            elif len(parts) > 2:
                wrong.append(f"{where}: not through the face of {theirs}")
    return wrong


def test_layersAndFaces() -> None:
    """
    Every import between subpackages goes down the layers, to the other
    subpackage's face.
    """
    assert violations(PACKAGE) == []


def test_checkSeesWrongImports(tmp_path: Path) -> None:
    """
    The check finds an import that goes up the layers, and one that goes
    past a face.
    """
    top = tmp_path / "apicontainer"
    for package in ("storage", "config", "pipeline"):
        (top / package).mkdir(parents=True)
        (top / package / "__init__.py").write_text("")
    (top / "storage" / "_x.py").write_text("from ..pipeline import Container\n")
    (top / "pipeline" / "_y.py").write_text(
        "from ..config._load import Limits\nfrom ..config import Config\nif TYPE_CHECKING:\n    from ..web import Ingress\n"
    )
    assert violations(top) == [
        "apicontainer/pipeline/_y.py:1 imports apicontainer.config._load: not through the face of config",
        "apicontainer/storage/_x.py:1 imports apicontainer.pipeline: pipeline is above storage",
    ]


def test_modulesAreShort() -> None:
    """
    No module is far over 400 lines.
    """
    long = {
        str(path.relative_to(PACKAGE.parent)): count
        for path in PACKAGE.rglob("*.py")
        if (count := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


@pytest.mark.process
def test_childProcessesImportLittle() -> None:
    """
    The child processes (the journal, the filesystem stash) import none of
    the configuration, pipeline, web or server modules: each module a
    child holds costs it memory and garbage-collector time on every batch.
    """
    import subprocess
    import sys

    for module in ("apicontainer.storage._journal", "apicontainer.stashes._fsprocess"):
        code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
        loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        heavy = [name for name in loaded if name.split(".")[:2] in (["apicontainer", p] for p in LAYERS[1:] if p != "stashes")]
        assert heavy == [], module


def _mapped() -> tuple[set[tuple[str | None, str]], set[str]]:
    """
    What CONTRIBUTING.md's layout map names: private modules with the
    subpackage they are listed under, and every file name it gives.
    """
    import re

    text = (PACKAGE.parent / "CONTRIBUTING.md").read_text()
    block = text[text.index("```\napicontainer/") :]
    block = block[: block.index("\n```", 4)]
    package: str | None = None
    private, names = set(), set()
    for line in block.splitlines():
        heading = re.match(r"  (\w+)/\s", line)
        if heading:
            package = heading.group(1) if heading.group(1) in LAYERS else None
        for name in re.findall(r"\b(_\w+|\w+\.(?:py|html|yaml))\b", line):
            names.add(name)
            if name.startswith("_") and package is not None:
                private.add((package, name))
    return private, names


def test_mapMatchesTheTree() -> None:
    """
    CONTRIBUTING.md's layout map names every module and data file of the
    package, each private module under the subpackage that holds it.
    """
    private, names = _mapped()
    tree = set()
    for path in PACKAGE.rglob("*"):
        if path.suffix in (".py", ".yaml", ".html") and path.name != "__init__.py":
            parts = path.relative_to(PACKAGE).parts
            tree.add((parts[0] if len(parts) == 2 else None, path.stem if path.suffix == ".py" else path.name))
    unnamed = sorted(
        f"{package or ''}/{name}" for package, name in tree if name not in names and f"{name}.py" not in names
    )
    assert unnamed == []
    assert sorted(entry for entry in private if entry not in tree) == []
