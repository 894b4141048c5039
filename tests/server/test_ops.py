"""
What operators rely on: metrics, readiness, the OpenAPI document (checked
with openapi-spec-validator and schemathesis against the live server) and
hot reload.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import fail, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from apicontainer.interfaces import IProbe
from apicontainer.testing import ContainerHarness, MemoryStash

from tests.conftest import DEFAULT, RunningServer


@implementer(IProbe)
class ProbedStash(MemoryStash):
    reachable = True

    def probe(self):  # type: ignore[no-untyped-def]
        return succeed(None) if self.reachable else fail(ConnectionRefusedError("no route to the store"))


class MetricsAndReadinessTests(SynchronousTestCase):
    def test_metrics(self) -> None:
        """
        After a stored and a queued UOW, the metrics count them by state,
        the verdicts and rollbacks by stash, the fail queue depth, the spool
        file left, and the request sizes.
        """
        a, b = MemoryStash("a"), MemoryStash("b")
        h = ContainerHarness(Path(self.mktemp()), [a, b])
        h.request("PUT", "/items/1", b"12345")
        b.failWith = 503
        h.request("PUT", "/items/2", b"x")
        response = h.admin("GET", "/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(response.header("content-type").startswith("text/plain"))
        text = response.body.decode()
        for line in (
            'apicontainer_uows_total{route="/items/<id>",state="stored"} 1.0',
            'apicontainer_uows_total{route="/items/<id>",state="queued"} 1.0',
            'apicontainer_stash_verdicts_total{stash="b",status="503",verdict="failed"} 1.0',
            'apicontainer_stash_verdicts_total{stash="a",status="200",verdict="stored"} 2.0',
            'apicontainer_rollbacks_total{result="ok",stash="a"} 1.0',
            'apicontainer_failqueue{state="queued"} 1.0',
            "apicontainer_spool_files 1.0",
            "apicontainer_request_bytes_count 2.0",
            "apicontainer_request_bytes_sum 6.0",
            'apicontainer_stash_seconds_count{stash="a"} 2.0',
            "apicontainer_in_flight 0.0",
        ):
            self.assertIn(line, text)

    def test_ready(self) -> None:
        """
        /_ready is 200 when every probed stash answers, 503 with the reason
        when one does not.
        """
        probed = ProbedStash("db")
        h = ContainerHarness(Path(self.mktemp()), [probed])
        self.assertEqual(h.admin("GET", "/_ready").json(), {"ready": True, "reasons": []})
        probed.reachable = False
        response = h.admin("GET", "/_ready")
        self.assertEqual(response.code, 503)
        self.assertEqual(response.json()["reasons"], ["stash db is unreachable: no route to the store"])




def fetch(url: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.integration
def test_openapi(server: RunningServer, tmp_path: Path) -> None:
    """
    The OpenAPI document of the running server is valid OpenAPI 3.1, and
    schemathesis, sending generated requests to ingress and the admin API,
    finds no undocumented status, content type or body, and no 5xx.
    """
    from openapi_spec_validator import validate

    status, body = fetch(f"http://127.0.0.1:{server.adminPort}/_openapi.json")
    assert status == 200
    document = json.loads(body)
    validate(document)
    assert "/items/{id}" in document["paths"] and "/_failed/{uowId}/retry" in document["paths"]
    spec = tmp_path / "openapi.json"
    spec.write_bytes(body)
    schemathesis = str(Path(sys.executable).parent / "schemathesis")
    checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
    for port, paths in ((server.port, "^/items"), (server.adminPort, "^/(_(?!reload)|metrics)")):
        result = subprocess.run(
            [schemathesis, "run", str(spec), "--url", f"http://127.0.0.1:{port}", "--include-path-regex", paths,
             "--checks", checks, "--max-examples", "15", "--phases", "coverage,fuzzing", "-w", "1", "--seed", "7"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )
        assert result.returncode == 0, result.stdout[-3000:]


RELOADED = DEFAULT.replace(
    "routes:\n", "routes:\n  - path: /things/<id>\n    stashes: [records]\n    read: [records]\n"
)


def reloadUnderLoad(server: RunningServer, config: str) -> dict[str, list[str]]:
    """
    Write C{config} and POST /_reload while a client writes without pause;
    check that the reload and every write succeeded.

    @return: The stash names by what the reload did to them.
    """
    failures: list[object] = []
    stop = threading.Event()
    written = [0]

    def load() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                status = server.request("PUT", f"/items/load-{n}", b"x")[0]
            except OSError as e:
                failures.append(e)
                continue
            if status != 200:
                failures.append(status)
            written[0] = n

    writer = threading.Thread(target=load)
    writer.start()
    try:
        waitFor(lambda: written[0] >= 5, 30, "five writes before the reload")
        server.configPath.write_text(config)
        status, body = fetch(f"http://127.0.0.1:{server.adminPort}/_reload", "POST")
        assert status == 200, body
        after = written[0]
        waitFor(lambda: written[0] >= after + 5, 30, "five writes after the reload")
    finally:
        stop.set()
        writer.join()
    assert failures == []
    return json.loads(body)  # type: ignore[no-any-return]


@pytest.mark.integration
def test_reload(server: RunningServer) -> None:
    """
    POST /_reload switches to the edited file between UOWs, without a
    failed request under load; a wrong file is refused with its reason and
    the running configuration stays; SIGHUP reloads too.
    """
    admin = f"http://127.0.0.1:{server.adminPort}"
    assert server.request("PUT", "/things/1", b"x")[0] == 404
    changes = reloadUnderLoad(server, RELOADED.format(port=server.port, admin=server.adminPort, data=server.dataDir))
    assert changes["kept"] == ["records", "files"]
    assert server.request("PUT", "/things/1", b"x")[0] == 200

    # A filesystem stash changed in place: the new one takes over the same
    # root (and its child process) while the old one finishes its UOWs.
    good = server.configPath.read_text()
    changes = reloadUnderLoad(server, good.replace("root: files}", "root: files, timeout_s: 20}"))
    assert changes["changed"] == ["files"]
    assert server.request("PUT", "/items/after-change", b"changed")[0] == 200
    status, _, body = server.request("GET", "/items/after-change")
    assert (status, body) == (200, b"changed")

    server.configPath.write_text(good.replace("type: filesystem", "type: filesytem"))
    status, body = fetch(admin + "/_reload", "POST")
    assert status == 400
    assert "stashes.files.type: unknown stash type 'filesytem'" in json.loads(body)["message"]
    assert server.request("PUT", "/items/after-bad", b"x")[0] == 200

    server.configPath.write_text(good.replace("listen: \"tcp:", "listen: \"tcp:1", 1))
    status, body = fetch(admin + "/_reload", "POST")
    assert (status, json.loads(body)["error"]) == (400, "bad_config")
    assert "needs a restart" in json.loads(body)["message"]

    server.configPath.write_text(good.replace("  - path: /things/<id>\n    stashes: [records]\n    read: [records]\n", ""))
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while server.request("PUT", "/things/2", b"x")[0] != 404:
        assert time.monotonic() < deadline, "SIGHUP did not reload"
        time.sleep(0.1)
    assert "configuration reloaded" in server.log.read_text()


def waitFor(condition: Any, timeout: float, what: str) -> None:
    """
    Poll C{condition} until it is true, for at most C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout}s"
        time.sleep(0.1)


@pytest.mark.integration
def test_reloadSQLiteStash(server: RunningServer) -> None:
    """
    Every change to a sqlite stash reloads within seconds, by SIGHUP (only
    its timeout_s) and by POST /_reload (its path): the new stash gets a
    started thread of its own, and writes after the reload land in the new
    database.
    """
    good = server.configPath.read_text()
    assert server.process is not None
    server.configPath.write_text(good.replace("path: records.sqlite3}", "path: records.sqlite3, timeout_s: 20}"))
    os.kill(server.process.pid, signal.SIGHUP)
    waitFor(lambda: "configuration reloaded" in server.log.read_text(), 10, "the SIGHUP reload")
    assert server.request("PUT", "/items/1", b"one")[0] == 200

    server.configPath.write_text(good.replace("path: records.sqlite3}", "path: moved.sqlite3}"))
    started = time.monotonic()
    status, body = fetch(f"http://127.0.0.1:{server.adminPort}/_reload", "POST")
    assert (status, json.loads(body)["changed"]) == (200, ["records"]), body
    assert time.monotonic() - started < 10
    assert server.request("PUT", "/items/2", b"two")[0] == 200
    assert (server.dataDir / "moved.sqlite3").exists()
    assert server.request("GET", "/items/2")[2] == b"two"


@pytest.mark.integration
def test_reloadThatCannotStartChangesNothing(server: RunningServer) -> None:
    """
    A reload whose new stash cannot start (its database path is a
    directory) is refused whole, with a 400 that names the stash and one log
    line; the running configuration goes on serving.
    """
    (server.dataDir / "adir.sqlite3").mkdir()
    good = server.configPath.read_text()
    server.configPath.write_text(
        good.replace("path: records.sqlite3}", "path: adir.sqlite3}").replace(
            "  - path: /items/<id>", "  - path: /new/<id>\n    stashes: [records]\n  - path: /items/<id>"
        )
    )
    status, body = fetch(f"http://127.0.0.1:{server.adminPort}/_reload", "POST")
    message = json.loads(body)["message"]
    assert (status, json.loads(body)["error"]) == (400, "bad_config"), body
    assert "stashes.records: could not start" in message, message
    assert server.request("PUT", "/new/1", b"x")[0] == 404
    assert server.request("PUT", "/items/1", b"x")[0] == 200
    assert server.request("GET", "/items/1")[2] == b"x"
    assert server.log.read_text().count("reload refused") == 1


@pytest.mark.integration
def test_reloadWhoseClientGoesAway(server: RunningServer) -> None:
    """
    A client that gives up on POST /_reload does not cancel it half-way:
    the reload completes, writes and /_ready go on answering, and SIGTERM
    stops the server within its drain timeout.
    """
    good = server.configPath.read_text()
    server.configPath.write_text(good.replace("path: records.sqlite3}", "path: other.sqlite3}"))
    connection = socket.create_connection(("127.0.0.1", server.adminPort))
    connection.sendall(b"POST /_reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    connection.close()
    waitFor(lambda: "configuration reloaded" in server.log.read_text(), 10, "the reload")
    assert "could not start" not in server.log.read_text()
    assert server.request("PUT", "/items/1", b"x")[0] == 200
    assert fetch(f"http://127.0.0.1:{server.adminPort}/_ready", "GET")[0] == 200
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    # twist ends a clean shutdown by re-raising the signal on itself.
    assert server.process.wait(40) == -signal.SIGTERM
    assert "Main loop terminated" in server.log.read_text()
