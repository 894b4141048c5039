"""
The real server killed with SIGKILL at each named step of the pipeline, then
restarted: invariants 1 to 4 of docs/design.md hold against what the
client was told.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from apicontainer._crashpoints import ENVIRONMENT
from apicontainer.stashes._filesystem import currentVersion

from tests.conftest import RunningServer

pytestmark = pytest.mark.integration

CONFIG = """\
listen: "tcp:{port}:interface=127.0.0.1"
admin_listen: "tcp:{admin}:interface=127.0.0.1"
data_dir: {data}
failqueue: {{retry: {{initial_s: 0.2, factor: 1, max_delay_s: 0.2, max_attempts: 1000}}}}
stashes:
  records: {{type: sqlite, path: records.sqlite3}}
  files: {{type: filesystem, root: files, part: attachment}}
routes:
  - path: /items/<id>
    stashes: [records, files]
    read: [records]
"""

BOUNDARY = "b0undary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def form(attachment: bytes) -> bytes:
    return (
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"attachment\"\r\n\r\n".encode()
        + attachment
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def state(server: RunningServer, key: str = "/items/1") -> tuple[int | None, int | None]:
    """
    The UOW whose write each store holds for C{key}: (SQLite, filesystem).
    """
    db = sqlite3.connect(server.dataDir / "records.sqlite3")
    try:
        row = db.execute("SELECT uow FROM documents WHERE key = ? AND body IS NOT NULL", (key,)).fetchone()
    finally:
        db.close()
    pointer = server.dataDir / "files" / (key.strip("/") + ".doc")
    try:
        target = currentVersion(pointer)
    except NotADirectoryError:
        target = None
    fileUOW = None if target is None else int(target.rsplit(".v", 1)[1])
    return (row[0] if row else None, fileUOW)


def attempt(server: RunningServer, body: bytes, contentType: str = MULTIPART) -> tuple[int, dict] | None:  # type: ignore[type-arg]
    """
    Send a write; L{None} when the server died before answering.
    """
    try:
        status, _, raw = server.request("PUT", "/items/1", body, {"Content-Type": contentType})
    except (http.client.HTTPException, ConnectionError, OSError):
        return None
    return status, json.loads(raw)


def quiet(server: RunningServer) -> None:
    """
    Wait until nothing is spooled but what the fail queue holds.
    """
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        spooled = {int(name.split(".")[0]) for name in os.listdir(server.dataDir / "spool")}
        failed = {entry["uow"] for entry in server.admin("GET", "/_failed")[1]["failed"]}
        if spooled <= failed and server.admin("GET", "/_health")[1]["in_flight"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError("the server did not become quiet")


def crashRun(tmp_path: Path, point: str, body: bytes, contentType: str = MULTIPART, breakFiles: bool = False) -> tuple[RunningServer, tuple[int, dict] | None]:  # type: ignore[type-arg]
    """
    Store version 1 of /items/1, then send version 2 to a server armed to
    die at C{point}, and restart it without the crash point.
    """
    server = RunningServer(tmp_path, CONFIG)
    server.start()
    first = attempt(server, form(b"v1"))
    assert first is not None and first[0] == 200
    assert state(server) == (1, 1)
    server.kill()
    if breakFiles:
        root = server.dataDir / "files"
        shutil.move(root, server.dataDir / "files.away")
        root.write_bytes(b"broken")
    server.start(env={ENVIRONMENT: point})
    told = attempt(server, body, contentType)
    if told is None:
        assert server.waitForDeath() == -9, f"{point} was not reached"
    server.kill()
    if breakFiles:
        (server.dataDir / "files").unlink()
        shutil.move(server.dataDir / "files.away", server.dataDir / "files")
    server.start()
    return server, told


@pytest.mark.parametrize(
    "point",
    ["after-spool-write", "stored:records", "stored:files", "during-commit", "before-spool-delete"],
)
def test_crashOnTheWayToStored(tmp_path: Path, point: str) -> None:
    """
    A crash anywhere on the way to a 200: after restart the write is in both
    stores (recovery finished it), nothing is left spooled or queued, and the
    UOW's final state is stored.
    """
    server, told = crashRun(tmp_path, point, form(b"v2"))
    try:
        assert told is None
        quiet(server)
        records, files = state(server)
        assert records == files and records is not None and records > 1
        assert os.listdir(server.dataDir / "spool") == []
        assert server.admin("GET", f"/_uow/{records}")[1]["state"] == "stored"
    finally:
        server.kill()


@pytest.mark.parametrize("point", ["stored:records", "during-rollback", "before-spool-delete"])
def test_crashOnTheWayToRejected(tmp_path: Path, point: str) -> None:
    """
    A crash while a request that one stash rejects (a malformed multipart
    body: 400) is being rolled back: after restart neither store holds it;
    both still hold version 1, and nothing is spooled.
    """
    server, told = crashRun(tmp_path, point, b"not multipart at all")
    try:
        assert told is None
        quiet(server)
        assert state(server) == (1, 1)
        assert os.listdir(server.dataDir / "spool") == []
        db = sqlite3.connect(server.dataDir / "state.sqlite3")
        try:
            finals = db.execute("SELECT uow, state FROM uows WHERE uow > 1").fetchall()
        finally:
            db.close()
        assert [state for _, state in finals] == ["rejected"]
        assert server.admin("GET", f"/_uow/{finals[0][0]}")[1]["state"] == "rejected"
    finally:
        server.kill()


def test_crashAfterFailQueueWrite(tmp_path: Path) -> None:
    """
    A crash right after a 5xx UOW was recorded in the fail queue: after
    restart (the destination repaired meanwhile) the retry engine stores it
    in both stores; meanwhile it was in neither.
    """
    server, told = crashRun(tmp_path, "after-failqueue-write", form(b"v2"), breakFiles=True)
    try:
        assert told is None
        quiet(server)
        deadline = time.monotonic() + 10
        while server.admin("GET", "/_failed")[1]["failed"] and time.monotonic() < deadline:
            time.sleep(0.05)
        records, files = state(server)
        assert records == files and records is not None and records > 1
        assert os.listdir(server.dataDir / "spool") == []
    finally:
        server.kill()


def test_queuedNeverHalfApplied(tmp_path: Path) -> None:
    """
    With the filesystem broken, a write answers 503 queued and SQLite keeps
    version 1; once the filesystem is back the fail queue drains by itself
    and both stores hold version 2.
    """
    server = RunningServer(tmp_path, CONFIG)
    server.start()
    try:
        assert attempt(server, form(b"v1"))[0] == 200  # type: ignore[index]
        root = server.dataDir / "files"
        shutil.move(root, server.dataDir / "files.away")
        root.write_bytes(b"broken")
        status, report = attempt(server, form(b"v2"))  # type: ignore[misc]
        assert (status, report["outcome"]) == (503, "queued")
        assert state(server)[0] == 1
        root.unlink()
        shutil.move(server.dataDir / "files.away", root)
        quiet(server)
        deadline = time.monotonic() + 10
        while server.admin("GET", "/_failed")[1]["failed"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state(server) == (report["uow"], report["uow"])
    finally:
        server.kill()


def test_idempotencyKeyAcrossRestart(tmp_path: Path) -> None:
    """
    A repeat of an acknowledged request after a kill -9 and restart gets the
    first answer and UOW id, and creates no second UOW.
    """
    server = RunningServer(tmp_path, CONFIG)
    server.start()
    try:
        headers = {"Content-Type": MULTIPART, "Idempotency-Key": "order-77"}
        status, _, first = server.request("PUT", "/items/1", form(b"v1"), headers)
        assert status == 200
        server.kill()
        server.start()
        status, replayHeaders, again = server.request("PUT", "/items/1", form(b"v1"), headers)
        assert (status, json.loads(again)) == (200, json.loads(first))
        assert replayHeaders["idempotent-replayed"] == "true"
        status, _, other = server.request("PUT", "/items/1", form(b"v9"), headers)
        assert status == 422
        assert state(server) == (1, 1)
    finally:
        server.kill()
