"""
The real server on a real full disk: a small tmpfs as its data directory.

Mounting needs root; elsewhere these tests skip (and fail under
APICONTAINER_REQUIRE_SERVICES=1, as in CI, which runs as root).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.conftest import RunningServer
from tests.system.test_crashpoints import MULTIPART, form

pytestmark = pytest.mark.integration


@contextmanager
def smallDisk(where: Path, size: str) -> Iterator[Path]:
    """
    A tmpfs of C{size} mounted at C{where}, unmounted afterwards.
    """
    where.mkdir()
    if os.geteuid() != 0:
        reason = "mounting a small tmpfs needs root"
        if os.environ.get("APICONTAINER_REQUIRE_SERVICES") == "1":
            pytest.fail(reason + "; APICONTAINER_REQUIRE_SERVICES=1 requires it")
        pytest.skip(reason)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> Path:
    """
    Fill C{disk} to the last byte with a file of zeros, and return its path.
    """
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            try:
                while f.write(b"\0" * size):
                    pass
            except OSError:
                continue
    return filler


def until(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """
    Poll C{condition} until it is true, for at most C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} did not hold within {timeout}s")


class GatedDownstream:
    """
    A downstream HTTP API on loopback whose writes wait until the test opens
    the gate, then answer C{status}.
    """

    def __init__(self) -> None:
        self.arrived = threading.Event()
        self.gate = threading.Event()
        self.status = 503
        self.documents: dict[str, bytes] = {}
        downstream = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                body = downstream.documents.get(self.path)
                self.send_response(404 if body is None else 200)
                self.send_header("content-length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                downstream.arrived.set()
                downstream.gate.wait(30)
                status = downstream.status
                if status < 300:
                    downstream.documents[self.path] = body
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def do_DELETE(self) -> None:
                downstream.documents.pop(self.path, None)
                self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()


def test_writeMeetingENOSPCIsNeverForgotten(tmp_path: Path) -> None:
    """
    The disk fills while a write is under way (one stash stored, the other
    still waiting on its downstream), then the downstream fails it: the
    rollback and the fail queue record meet ENOSPC for real. The client gets
    its 503; the running server keeps the UOW as unsettled (/_uow, /_health
    say so) and an Idempotency-Key resend gets 409 meanwhile (its first
    request is still under way; the full disk does not matter to a resend,
    which writes nothing). Once space returns it is re-driven without a
    restart and ends stored in both stores, and the resend gets that final
    answer.
    """
    downstream = GatedDownstream()
    try:
        with smallDisk(tmp_path / "var", "16m"):
            config = f"""\
            listen: "tcp:{{port}}:interface=127.0.0.1"
            admin_listen: "tcp:{{admin}}:interface=127.0.0.1"
            data_dir: {{data}}
            limits: {{{{min_free_bytes: 0}}}}
            failqueue: {{{{retry: {{{{initial_s: 0.5, factor: 1, max_delay_s: 0.5}}}}}}}}
            stashes:
              records: {{{{type: sqlite, path: records.sqlite3}}}}
              down: {{{{type: http, url: "http://127.0.0.1:{downstream.port}", timeout_s: 60}}}}
            routes:
              - path: /items/<id>
                stashes: [records, down]
                read: [records]
            """
            server = RunningServer(tmp_path, config)
            server.start()
            try:
                headers = {"Idempotency-Key": "order-1"}
                answer: list[Any] = []
                client = threading.Thread(
                    target=lambda: answer.append(server.request("PUT", "/items/1", b"x" * 4096, headers))
                )
                client.start()
                assert downstream.arrived.wait(30), "the write never reached the downstream"
                filler = fill(server.dataDir)
                downstream.gate.set()
                client.join(60)
                status, _, body = answer[0]
                assert (status, json.loads(body)["outcome"]) == (503, "queued")
                uow = json.loads(body)["uow"]
                assert server.admin("GET", f"/_uow/{uow}")[1]["state"] == "unsettled"
                health = server.admin("GET", "/_health")[1]
                assert health["status"] == "attention" and health["unsettled"] == 1, health
                assert server.admin("GET", "/_failed")[1]["failed"] == []
                status, _, body = server.request("PUT", "/items/1", b"x" * 4096, headers)
                assert (status, json.loads(body)["error"]) == (409, "idempotency_key")
                downstream.status = 200
                filler.unlink()
                until(
                    lambda: server.admin("GET", f"/_uow/{uow}")[1]["state"] == "stored",
                    what=f"UOW {uow} stored after space returned",
                )
                assert server.request("GET", "/items/1")[2] == b"x" * 4096
                assert downstream.documents["/items/1"] == b"x" * 4096
                assert server.admin("GET", "/_health")[1]["status"] == "ok"
                status, _, body = server.request("PUT", "/items/1", b"x" * 4096, headers)
                assert (status, json.loads(body)["uow"]) == (200, uow)
            finally:
                server.kill()
    finally:
        downstream.close()


FILL_CONFIG = """\
listen: "tcp:{{port}}:interface=127.0.0.1"
admin_listen: "tcp:{{admin}}:interface=127.0.0.1"
data_dir: {{data}}
{limits}
failqueue: {{{{retry: {{{{initial_s: 0.5, factor: 1, max_delay_s: 0.5}}}}}}}}
stashes:
  records: {{{{type: sqlite, path: records.sqlite3}}}}
  files: {{{{type: filesystem, root: files, part: attachment}}}}
routes:
  - path: /items/<id>
    stashes: [records, files]
    read: [records]
"""


def writeUntilFull(server: RunningServer, count: int = 200) -> dict[int, tuple[int, str]]:
    """
    Send 256 KiB multipart writes with Idempotency-Keys, one after another,
    until one is refused for lack of space (or C{count} are sent).

    @return: Key number to (status, outcome or error).
    """
    answers = {}
    for n in range(count):
        status, _, body = server.request(
            "PUT",
            f"/items/{n}",
            form(b"%06d" % n + b"a" * 256 * 1024),
            {"Content-Type": MULTIPART, "Idempotency-Key": f"k-{n}"},
        )
        decoded = json.loads(body)
        answers[n] = (status, decoded.get("outcome") or decoded.get("error"))
        if status != 200:
            break
    return answers


def test_defaultReserveRefusesBeforeENOSPC(tmp_path: Path) -> None:
    """
    On the default min_free_bytes, writes of 256 KiB on a small disk are
    stored until one is refused with 503 disk_full before anything is
    spooled: none of them meets ENOSPC.
    """
    with smallDisk(tmp_path / "var", "24m"):
        server = RunningServer(tmp_path, FILL_CONFIG.format(limits=""))
        server.start()
        try:
            answers = writeUntilFull(server)
            *stored, last = answers.values()
            assert stored and all(answer == (200, "stored") for answer in stored), answers
            assert last == (503, "disk_full"), answers
            assert os.listdir(server.dataDir / "spool") == []
        finally:
            server.kill()


def readBack(dataDir: Path, key: str) -> tuple[bytes | None, bytes | None]:
    """
    The body under C{key} in the records and in the files, read from the
    stores themselves (with the server stopped).
    """
    from apicontainer.blocking import inline
    from apicontainer.stashes._filesystem import FilesystemStash
    from apicontainer.stashes._sqlite import SQLiteStash

    found = []
    for stash in (
        SQLiteStash("records", dataDir / "records.sqlite3", inline),
        FilesystemStash("files", dataDir / "files", inline),
    ):
        stash.start()
        document = stash.read(key).result
        stash.stop()
        found.append(None if document is None else document.body)
    return found[0], found[1]


def test_noReserveStillConverges(tmp_path: Path) -> None:
    """
    With min_free_bytes: 0, writes go on until the disk is full. Once space
    returns the server settles everything with no restart: every write
    answered 200 is in both stores, every other one in both or in neither,
    and nothing stays unsettled, queued or spooled.
    """
    with smallDisk(tmp_path / "var", "12m"):
        server = RunningServer(tmp_path, FILL_CONFIG.format(limits="limits: {{min_free_bytes: 0}}"))
        # What an operator frees once the disk is full.
        ballast = tmp_path / "var" / "ballast"
        ballast.write_bytes(b"\0" * (4 << 20))
        server.start()
        try:
            answers = writeUntilFull(server)
            filler = fill(tmp_path / "var")
            status, _, _ = server.request("PUT", "/items/late", form(b"late"), {"Content-Type": MULTIPART})
            assert status == 503
            filler.unlink()
            ballast.unlink()
            until(
                lambda: server.admin("GET", "/_health")[1]["status"] == "ok"
                and server.admin("GET", "/_failed")[1]["failed"] == []
                and not os.listdir(server.dataDir / "spool"),
                timeout=60,
                what="every write settled",
            )
        finally:
            server.kill()
        for n, (status, _) in answers.items():
            # The records hold the whole multipart body, the files its part.
            records, files = readBack(server.dataDir, f"/items/{n}")
            assert (records is None) == (files is None), (n, answers[n])
            if files is not None:
                assert files.startswith(b"%06d" % n) and files in records, (n, answers[n])
            if status == 200:
                assert files is not None, (n, answers)
