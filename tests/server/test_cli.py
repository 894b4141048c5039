"""
The operator's `apicontainer` command against the real server.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import DEFAULT, RunningServer

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    """
    The real server, whose retry engine leaves a failed UOW alone for ten
    minutes: the operator's commands, not the engine, move it.
    """
    running = RunningServer(tmp_path, DEFAULT + "failqueue: {{retry: {{initial_s: 600}}}}\n")
    running.start()
    try:
        yield running
    finally:
        running.kill(signal.SIGTERM)

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
    good = run(None, "check-config", str(Path(__file__).parents[2] / "apicontainer" / "config" / "default.yaml"))
    assert good.returncode == 0 and ": OK: 2 stash(es) (records, files), 1 route(s)" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("stashes:\n  a: {type: nope}\nroutes: [{path: /x, stashes: [a]}]\n")
    result = run(None, "check-config", str(bad))
    assert result.returncode == 78
    assert result.stderr == f"apicontainer: {bad}:2: stashes.a.type: unknown stash type 'nope' (known: filesystem, http, postgres, redis, sqlite)\n"


def test_checkConfigPaths(tmp_path: Path) -> None:
    """
    check-config runs every check that changes nothing: a data_dir that is a
    file, or under a file or under /proc, and a SQLite path that is a
    directory, are refused with one line each and exit status 78, and
    nothing is created; the server refuses a wrong data_dir at start.
    """
    (tmp_path / "afile").write_bytes(b"")
    (tmp_path / "adir.sqlite3").mkdir()
    stashes = "stashes:\n  records: {{type: sqlite, path: {path}}}\nroutes: [{{path: /x, stashes: [records]}}]\n"
    cases = {
        f"data_dir: {tmp_path}/afile\n": f"data_dir: {tmp_path}/afile is a file, not a directory",
        f"data_dir: {tmp_path}/afile/var\n": f"data_dir: {tmp_path}/afile/var cannot be made: {tmp_path}/afile is a file",
        "data_dir: /proc/apicontainer\n": "data_dir: /proc/apicontainer is on a proc file system",
        f"data_dir: {tmp_path}/var\n" + stashes.format(path=f"{tmp_path}/adir.sqlite3"): (
            f":3: stashes.records: {tmp_path}/adir.sqlite3 is a directory, not a file"
        ),
    }
    for index, (text, expected) in enumerate(cases.items()):
        path = tmp_path / f"config-{index}.yaml"
        path.write_text(text if "stashes" in text else text + stashes.format(path="r.sqlite3"))
        result = run(None, "check-config", str(path))
        assert result.returncode == 78, (text, result.stdout)
        assert expected in result.stderr.splitlines()[0], (expected, result.stderr)
        assert result.stderr.startswith(f"apicontainer: {path}")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("config-")) == ["adir.sqlite3", "afile"]
    server = subprocess.run(
        [str(Path(sys.executable).parent / "twist"), "apicontainer", "--config", str(tmp_path / "config-0.yaml")],
        capture_output=True, text=True, timeout=60,
    )
    assert server.returncode == 78
    assert server.stderr.strip() == f"apicontainer: {tmp_path}/config-0.yaml: data_dir: {tmp_path}/afile is a file, not a directory"


def test_portInUseSaidOnStderr(tmp_path: Path) -> None:
    """
    A listen port in use stops the server with status 1 and the reason in
    one line on standard error.
    """
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        config = tmp_path / "config.yaml"
        config.write_text(
            f'listen: "tcp:{port}:interface=127.0.0.1"\nadmin_listen: "tcp:0:interface=127.0.0.1"\n'
            f"data_dir: {tmp_path}/var\nstashes: {{r: {{type: sqlite, path: r.sqlite3}}}}\n"
            "routes: [{path: /x, stashes: [r]}]\n"
        )
        server = subprocess.run(
            [str(Path(sys.executable).parent / "twist"), "apicontainer", "--config", str(config)],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        taken.close()
    assert server.returncode == 1
    [line] = server.stderr.splitlines()
    assert line.startswith("apicontainer: could not start: ") and "Address already in use" in line, line


def test_mallocArenas(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The server caps glibc's malloc arenas, unless the operator chose a
    number with MALLOC_ARENA_MAX.
    """
    import platform

    from apicontainer.server._tap import limitMallocArenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limitMallocArenas() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc: there is no arena cap to set")
    assert limitMallocArenas() is True
