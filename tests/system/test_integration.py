"""
The real server, started with `twist apicontainer`, over loopback: writes land
in SQLite and on disk or in neither, and bad input changes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred, DeferredList

from tests.conftest import DEFAULT, TWIST, RunningServer

pytestmark = pytest.mark.integration


def sqliteRow(server: RunningServer, key: str) -> tuple[bytes | None, int] | None:
    db = sqlite3.connect(server.dataDir / "records.sqlite3")
    try:
        row = db.execute("SELECT body, uow FROM documents WHERE key = ?", (key,)).fetchone()
    finally:
        db.close()
    return None if row is None else (row[0], row[1])


def test_writeLandsInBothStores(server: RunningServer) -> None:
    """
    A PUT is answered 200 with the design's body and is in SQLite and on
    disk; GET reads it back; the spool is empty.
    """
    status, headers, body = server.request("PUT", "/items/42", b'{"name": "widget"}', {"Content-Type": "application/json"})
    assert status == 200, body
    assert headers["content-type"] == "application/json"
    report = json.loads(body)
    assert report["outcome"] == "stored"
    assert report["stashes"] == {
        "records": {"verdict": "stored", "status": 200},
        "files": {"verdict": "stored", "status": 200},
    }
    assert sqliteRow(server, "/items/42") == (b'{"name": "widget"}', report["uow"])
    assert (server.dataDir / "files" / "items" / "42.doc").read_bytes() == b'{"name": "widget"}'
    assert os.listdir(server.dataDir / "spool") == []
    status, headers, body = server.request("GET", "/items/42")
    assert (status, body, headers["content-type"]) == (200, b'{"name": "widget"}', "application/json")


def test_brokenDestinationRollsBack(server: RunningServer) -> None:
    """
    With the filesystem stash's root replaced by a plain file after start, a
    write is a 5xx, the SQLite row keeps its before-image, the UOW is in the
    fail queue with its spool file, and an operator can drop it.
    """
    assert server.request("PUT", "/items/1", b"old")[0] == 200
    root = server.dataDir / "files"
    shutil.rmtree(root)
    root.write_bytes(b"not a directory")
    status, headers, body = server.request("PUT", "/items/1", b"new")
    report = json.loads(body)
    assert status == 503, body
    assert report["outcome"] == "queued"
    assert report["stashes"]["records"]["verdict"] == "stored"
    assert report["stashes"]["files"]["verdict"] == "failed"
    uow = report["uow"]
    assert headers["location"] == f"/_uow/{uow}"
    assert sqliteRow(server, "/items/1") == (b"old", 1)
    assert os.listdir(server.dataDir / "spool") == [f"{uow:020d}.uow"]
    status, failed = server.admin("GET", "/_failed")
    assert [entry["uow"] for entry in failed["failed"]] == [uow]
    status, state = server.admin("GET", f"/_uow/{uow}")
    assert (status, state["state"]) == (200, "queued")
    status, dropped = server.admin("DELETE", f"/_failed/{uow}")
    assert (status, dropped["state"]) == (200, "dropped")
    assert os.listdir(server.dataDir / "spool") == []
    assert server.admin("GET", "/_failed")[1] == {"failed": []}


@pytest.fixture
def largeServer(tmp_path: Path) -> Iterator[RunningServer]:
    """
    The server of the default config, taking bodies of up to 8 MiB.
    """
    running = RunningServer(tmp_path, DEFAULT.replace("max_body_bytes: 65536", "max_body_bytes: 8388608"))
    running.start()
    try:
        yield running
    finally:
        running.kill(signal.SIGTERM)


def test_largeBodyStreamsToEveryStore(largeServer: RunningServer) -> None:
    """
    A body larger than what the server holds in memory lands whole in both
    stores; a large body whose delivery failed is delivered from its spool
    file when retried, also after a restart.
    """
    server = largeServer
    body = os.urandom(3 * 2**20 + 7)
    status, _, answer = server.request("PUT", "/items/big", body, {"Content-Type": "application/octet-stream"})
    assert status == 200, answer
    uow = json.loads(answer)["uow"]
    assert sqliteRow(server, "/items/big") == (body, uow)
    assert (server.dataDir / "files" / "items" / "big.doc").read_bytes() == body
    assert server.request("GET", "/items/big")[2] == body

    root = server.dataDir / "files"
    shutil.move(root, server.dataDir / "files-aside")
    root.write_bytes(b"not a directory")
    second = body[::-1]
    status, _, answer = server.request("PUT", "/items/big", second)
    assert status == 503, answer
    queued = json.loads(answer)["uow"]
    server.kill(signal.SIGKILL)
    root.unlink()
    shutil.move(server.dataDir / "files-aside", root)
    server.start()
    status, answer = server.admin("POST", f"/_failed/{queued}/retry")
    # The retry engine, which looks at the fail queue as the server starts,
    # may be retrying it already (409), or have stored it already (404).
    stored = status == 404 and server.admin("GET", f"/_uow/{queued}")[1]["state"] == "stored"
    assert status in (200, 202, 409) or stored, (status, answer)
    deadline = time.monotonic() + 30
    while server.admin("GET", f"/_uow/{queued}")[1]["state"] != "stored":
        assert time.monotonic() < deadline, server.admin("GET", f"/_uow/{queued}")
        time.sleep(0.1)
    assert sqliteRow(server, "/items/big") == (second, queued)
    assert (root / "items" / "big.doc").read_bytes() == second
    assert os.listdir(server.dataDir / "spool") == []


def test_ackSurvivesKill9(server: RunningServer) -> None:
    """
    Killed with SIGKILL right after a 200, the server leaves the write in
    both stores; restarted on the same data, it serves it and numbers on.
    """
    status, _, body = server.request("PUT", "/items/7", b"durable")
    assert status == 200
    first = json.loads(body)["uow"]
    server.kill(signal.SIGKILL)
    assert sqliteRow(server, "/items/7") == (b"durable", first)
    assert (server.dataDir / "files" / "items" / "7.doc").read_bytes() == b"durable"
    server.start()
    assert server.request("GET", "/items/7")[2] == b"durable"
    status, _, body = server.request("PUT", "/items/8", b"next")
    assert json.loads(body)["uow"] > first


def rawExchange(port: int, head: bytes, chunks: list[bytes]) -> tuple[bytes, int]:
    """
    Send a request head, then body chunks, until the server closes; return
    what it answered and how many chunks it took.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        sent = 0
        try:
            for chunk in chunks:
                s.sendall(chunk)
                sent += 1
                time.sleep(0.005)
        except (BrokenPipeError, ConnectionResetError):
            pass
        received = b""
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                received += data
        except ConnectionResetError:
            pass
    return received, sent


def test_declaredBodyTooLarge(server: RunningServer) -> None:
    """
    A Content-Length over max_body_bytes is refused with 413 before the body
    is sent, and nothing is spooled.
    """
    head = b"PUT /items/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\n\r\n"
    received, _ = rawExchange(server.port, head, [])
    assert received.startswith(b"HTTP/1.1 413 "), received
    assert b"100 Continue" not in received
    assert b'"too_large"' in received
    assert os.listdir(server.dataDir / "spool") == []


def test_chunkedBodyCutOff(server: RunningServer) -> None:
    """
    A chunked body is cut off with 413 once it passes max_body_bytes (64 KiB
    here), long before the client has sent it all; nothing is spooled.
    """
    head = b"PUT /items/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (8192, b"x" * 8192)
    received, sent = rawExchange(server.port, head, [chunk] * 2000)
    assert received.startswith(b"HTTP/1.1 413 "), received[:200]
    assert sent < 2000
    assert os.listdir(server.dataDir / "spool") == []
    assert sqliteRow(server, "/items/1") is None


def test_hostilePathsChangeNothing(server: RunningServer) -> None:
    """
    Dot segments, encoded slashes and NUL are 400 with a JSON error, and no
    file appears outside the data directory.
    """
    for path in ("/items/..%2f..%2fescape", "/items/%2e%2e", "/items/a%00", "/items/%c0%ae"):
        status, headers, body = server.request("PUT", path, b"x")
        assert (status, headers["content-type"]) == (400, "application/json"), (path, body)
        assert b"Traceback" not in body
    assert not (server.directory / "escape").exists()
    assert os.listdir(server.dataDir / "spool") == []


def test_badConfigIsOneLine(tmp_path: Path) -> None:
    """
    A wrong config stops the start with exit status 78 and one line naming
    the file, line, key and problem; no traceback.
    """
    config = tmp_path / "config.yaml"
    config.write_text(DEFAULT.format(port=1, admin=2, data=tmp_path / "var").replace("type: filesystem", "type: filesytem"))
    result = subprocess.run([*TWIST, "apicontainer", "--config", str(config)], capture_output=True, timeout=60)
    assert result.returncode == 78
    lines = result.stderr.decode().strip().splitlines()
    assert lines == [
        f"apicontainer: {config}:7: stashes.files.type: unknown stash type 'filesytem' (known: filesystem, http, postgres, redis, sqlite)"
    ]
    assert not (tmp_path / "var").exists()


def test_portInUseExits(tmp_path: Path) -> None:
    """
    When its port is taken, the server says so and exits non-zero.
    """
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        running = RunningServer(tmp_path, DEFAULT.replace("{port}", str(port)))
        with pytest.raises(RuntimeError, match="exited with 1"):
            running.start()
        assert "could not start" in running.log.read_text()


def test_defaultConfigWithoutFlag(tmp_path: Path) -> None:
    """
    Without --config the server runs the embedded default, storing under
    ./var of its working directory.
    """
    for port in (8080, 8081):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port}, which the default config uses, is taken on this machine")
    process = subprocess.Popen([*TWIST, "apicontainer"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = RunningServer.__new__(RunningServer)
        client.adminPort, client.port, client.adminHeaders = 8081, 8080, {}
        deadline = time.monotonic() + 30
        while True:
            try:
                assert client.admin("GET", "/_health")[0] == 200
                break
            except OSError:
                assert time.monotonic() < deadline, "no health in 30s"
                time.sleep(0.1)
        assert client.request("PUT", "/items/1", b"x")[0] == 200
        assert (tmp_path / "var" / "records.sqlite3").exists()
        assert (tmp_path / "var" / "files" / "items" / "1.doc").read_bytes() == b"x"
    finally:
        process.terminate()
        process.wait(30)


@pytest_twisted.ensureDeferred
async def test_concurrentWritesOnOneKey(server: RunningServer) -> None:
    """
    Concurrent writes from a treq client, many on one key and some on others,
    are all stored; on the shared key the stores end with the write of the
    highest UOW id, in both stores alike.
    """
    base = f"http://127.0.0.1:{server.port}"

    async def put(path: str, body: bytes) -> dict:  # type: ignore[type-arg]
        response = await treq.put(base + path, data=body)
        assert response.code == 200
        return json.loads(await response.content())  # type: ignore[no-any-return]

    writes = [("/items/shared", b"v%d" % i) for i in range(30)]
    writes += [(f"/items/k{i}", b"k%d" % i) for i in range(10)]
    results = await DeferredList([Deferred.fromCoroutine(put(p, b)) for p, b in writes], fireOnOneErrback=True, consumeErrors=True)
    reports = {report["uow"]: writes[i] for i, (ok, report) in enumerate(results)}
    assert len(reports) == len(writes)
    lastOnShared = max(uow for uow, (path, _) in reports.items() if path == "/items/shared")
    expected = reports[lastOnShared][1]
    assert sqliteRow(server, "/items/shared") == (expected, lastOnShared)
    assert (server.dataDir / "files" / "items" / "shared.doc").read_bytes() == expected


def test_sigtermStopsCleanly(server: RunningServer) -> None:
    """
    SIGTERM stops the server after a clean shutdown (twist then ends by the
    same signal, as is the convention), nothing left spooled.
    """
    assert server.request("PUT", "/items/1", b"x")[0] == 200
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == -signal.SIGTERM
    assert "Main loop terminated." in server.log.read_text()
    assert os.listdir(server.dataDir / "spool") == []
