"""
The operator's `apicontainer` command against the real server.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import RunningServer

pytestmark = pytest.mark.integration

COMMAND = str(Path(sys.executable).parent / "apicontainer")


def run(server: RunningServer | None, *args: str) -> subprocess.CompletedProcess[str]:
    admin = ["--admin", f"http://127.0.0.1:{server.adminPort}"] if server else []
    return subprocess.run([COMMAND, *admin, *args], capture_output=True, text=True, timeout=60)


def test_failedWorkflow(server: RunningServer) -> None:
    """
    An operator lists a failed UOW, shows it with its per-stash report,
    retries it once the destination is repaired, and it is stored.
    """
    root = server.dataDir / "files"
    shutil.move(root, server.dataDir / "away")
    root.write_bytes(b"")
    status, _, body = server.request("PUT", "/items/1", b"x")
    uow = json.loads(body)["uow"]
    assert status == 503

    listed = run(server, "failed", "list")
    assert listed.returncode == 0, listed.stderr
    heading, row = listed.stdout.splitlines()
    assert heading.split() == ["UOW", "STATE", "ATTEMPTS", "STATUS", "NEXT", "ATTEMPT", "KEY"]
    assert row.split()[:4] == [str(uow), "queued", "1", "503"] and row.endswith("/items/1")

    shown = run(server, "failed", "show", str(uow))
    assert "state:           queued" in shown.stdout
    assert any(line.split()[:3] == ["files", "failed", "503"] for line in shown.stdout.splitlines())

    asJSON = json.loads(run(server, "--json", "failed", "list", "--state", "queued").stdout)
    assert [e["uow"] for e in asJSON["failed"]] == [uow]

    root.unlink()
    shutil.move(server.dataDir / "away", root)
    retried = run(server, "failed", "retry", str(uow))
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.startswith(f"UOW {uow}: stored")
    assert "state:           stored" in run(server, "uow", str(uow)).stdout
    assert run(server, "failed", "list").stdout.splitlines()[1:] == []


def test_dropAndErrors(server: RunningServer) -> None:
    """
    Drop removes a failed UOW; unknown ids are refused with exit status 1
    and the server's reason; an unreachable admin API is exit status 3.
    """
    root = server.dataDir / "files"
    shutil.rmtree(root)
    root.write_bytes(b"")
    uow = json.loads(server.request("PUT", "/items/1", b"x")[2])["uow"]
    assert run(server, "failed", "drop", str(uow)).returncode == 0
    missing = run(server, "failed", "drop", str(uow))
    assert missing.returncode == 1
    assert "is not in the fail queue" in missing.stderr
    unreachable = subprocess.run([COMMAND, "--admin", "http://127.0.0.1:9", "uow", "1"], capture_output=True, text=True)
    assert unreachable.returncode == 3
    assert "cannot reach the admin API" in unreachable.stderr


def test_checkConfig(tmp_path: Path) -> None:
    """
    check-config says OK for a good file and gives the one-line error for a
    bad one, with exit status 78.
    """
    good = run(None, "check-config", str(Path(__file__).parent.parent / "apicontainer" / "default.yaml"))
    assert good.returncode == 0 and ": OK: 2 stash(es) (records, files), 1 route(s)" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("stashes:\n  a: {type: nope}\nroutes: [{path: /x, stashes: [a]}]\n")
    result = run(None, "check-config", str(bad))
    assert result.returncode == 78
    assert result.stderr == f"apicontainer: {bad}:2: stashes.a.type: unknown stash type 'nope' (known: filesystem, http, postgres, redis, sqlite)\n"


def test_mallocArenas(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The server caps glibc's malloc arenas, unless the operator chose a
    number with MALLOC_ARENA_MAX.
    """
    import platform

    from apicontainer.tap import limitMallocArenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limitMallocArenas() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc: there is no arena cap to set")
    assert limitMallocArenas() is True
