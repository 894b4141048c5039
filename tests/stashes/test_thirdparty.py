"""
A stash type from another package is found by its type name: the example
package under examples/memory-stash, built and put on the path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.process

EXAMPLE = Path(__file__).parents[2] / "examples" / "memory-stash"


def test_entryPointStashIsFound(tmp_path: Path) -> None:
    """
    With the example's wheel on the path, its type 'memory' is among the
    stash types, a config naming it checks OK, and its own contract test
    passes.
    """
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(EXAMPLE)],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("apicontainer_memory_stash-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = dict(os.environ, PYTHONPATH=str(site))
    types = subprocess.run(
        [sys.executable, "-c", "from apicontainer.config import stashTypes; print(' '.join(stashTypes()))"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert types == ["filesystem", "http", "memory", "postgres", "redis", "sqlite"]
    config = tmp_path / "config.yaml"
    config.write_text(
        "stashes:\n  scratch: {type: memory}\n  records: {type: sqlite, path: r.sqlite3}\n"
        "routes: [{path: /items/<id>, stashes: [scratch, records], read: [scratch]}]\n"
    )
    checked = subprocess.run(
        [str(Path(sys.executable).parent / "apicontainer"), "check-config", str(config)],
        env=env, capture_output=True, text=True,
    )
    assert checked.returncode == 0, checked.stderr
    assert "2 stash(es) (scratch, records)" in checked.stdout
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        env=env, capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:]
    assert " passed" in result.stdout
