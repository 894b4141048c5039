"""
What the package ships: the twist plugin and not the tests, found by `twist`
from a wheel as well as from the editable install.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.process

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """
    A wheel built from the checkout, as pip would build it.
    """
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    [built] = out.glob("apicontainer-*.whl")
    return built


def test_wheelShipsPluginNotTests(wheel: Path) -> None:
    """
    The wheel has the plugin module, every module and data file of the
    package's tree (a subpackage missing from setup.cfg's list would be left
    out), no tests, and no __init__.py in twisted/ or twisted/plugins/ that
    would shadow Twisted's.
    """
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/apicontainer_plugin.py" in names
    tree = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "apicontainer").rglob("*")
        if path.suffix in (".py", ".yaml", ".html")
    }
    assert {"apicontainer/config/default.yaml", "apicontainer/web/failqueue.html"} <= tree
    assert tree - set(names) == set()
    assert not [n for n in names if n.startswith("tests/")]
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names


def test_twistFindsPluginFromWheel(wheel: Path, tmp_path: Path) -> None:
    """
    Unpacked on its own, away from the checkout, the wheel gives `twist` the
    apicontainer plugin.
    """
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]]))
    # -S: no site-packages processing, so the editable install's path to the
    # checkout is not on sys.path; only the wheel and the dependencies are.
    code = "import sys; from twisted.application.twist._twist import Twist; Twist.main(['twist', 'apicontainer', '--help'])"
    result = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout
    assert str(target) in subprocess.run(
        [sys.executable, "-S", "-c", "import apicontainer; print(apicontainer.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    ).stdout


def test_twistFindsPluginFromInstall() -> None:
    """
    The `twist` of this environment (the README's install) lists the plugin
    and its options.
    """
    twist = Path(sys.executable).parent / "twist"
    result = subprocess.run([str(twist), "apicontainer", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout
    assert "apicontainer" in subprocess.run([str(twist), "--help"], capture_output=True, text=True).stdout
