"""
The jetstream backends end to end: three instances of the real server on a
3-node JetStream cluster with PostgreSQL and Redis stashes, and the refusals
of configurations that cannot work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from apicontainer.testing import NATSCluster
from tests.conftest import TWIST
from tests.jscluster import Deployment, chaos
from tests.services import REDIS, require, requireJetStream

pytestmark = pytest.mark.integration


def _deployed(cluster: Any, directory: Path, failing: bool = False) -> Iterator[Deployment]:
    require("PostgreSQL", "127.0.0.1", 5432)
    require("Redis", *REDIS)
    running = Deployment(directory, cluster, failing=failing)
    running.start()
    try:
        yield running
    finally:
        running.stop()
        running.cleanUp()


@pytest.fixture
def deployment(natsCluster: Any, tmp_path: Path) -> Iterator[Deployment]:
    yield from _deployed(natsCluster, tmp_path)


@pytest.fixture
def failing(natsCluster: Any, tmp_path: Path) -> Iterator[Deployment]:
    """
    A deployment with the route C{/down/<id>}, whose stash's server is down.
    """
    yield from _deployed(natsCluster, tmp_path, failing=True)


def test_anyInstanceAnswersForTheCluster(deployment: Deployment) -> None:
    """
    A write to one instance is stored in both stores and read from another;
    its UOW ids come from the stream, increasing across instances; every
    instance reports the cluster link and consumes every partition; a
    resend with the same Idempotency-Key to another instance gets the first
    answer, and a different body under it gets 422.
    """
    a, b, c = deployment.instances
    ids = []
    for n, instance in enumerate([a, b, c, a]):
        status, _, body = instance.request("PUT", "/items/k", json.dumps({"v": n}).encode())
        assert status == 200, body
        ids.append(json.loads(body)["uow"])
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert json.loads(c.request("GET", "/items/k")[2]) == {"v": 3}
    assert deployment.redis(["k"]) == {"k": b'{"v": 3}'}
    status, record = b.admin("GET", f"/_uow/{ids[0]}")
    assert status == 200 and record["state"] == "stored"
    for instance in deployment.instances:
        status, health = instance.admin("GET", "/_health")
        assert status == 200 and health["status"] == "ok", health
        cluster = health["cluster"]
        assert cluster["connected"] and cluster["partitions_consumed"] == cluster["partitions"] == 8
        assert instance.admin("GET", "/_ready")[0] == 200
        _, _, metrics = instance._call(instance.adminPort, "GET", "/metrics", None, {})
        assert b"apicontainer_cluster_connected 1.0" in metrics
    first = a.request("PUT", "/items/i", b"one", {"Idempotency-Key": "key-1"})
    again = c.request("PUT", "/items/i", b"one", {"Idempotency-Key": "key-1"})
    assert first[0] == again[0] == 200 and json.loads(first[2]) == json.loads(again[2])
    other = b.request("PUT", "/items/i", b"two", {"Idempotency-Key": "key-1"})
    assert other[0] == 422, other
    assert deployment.settled()["messages"] == 0


def test_oneFailQueueForTheCluster(failing: Deployment) -> None:
    """
    A UOW that a stash fails (a PostgreSQL stash whose server is down) is
    answered 503 with its Location and waits in the one fail queue, which
    every instance lists; another instance retries it, and a third drops
    it, for all of them.
    """
    deployment = failing
    a, b, c = deployment.instances
    status, headers, body = a.request("PUT", "/down/1", b"x")
    assert status == 503 and json.loads(body)["outcome"] == "queued", body
    uowId = int(headers["location"].rsplit("/", 1)[1])

    def listed() -> list[list[int]]:
        return [[e["uow"] for e in i.admin("GET", "/_failed")[1]["failed"]] for i in deployment.instances]

    deadline = time.monotonic() + 10
    while listed() != [[uowId]] * 3:
        assert time.monotonic() < deadline, listed()
        time.sleep(0.1)
    status, retried = b.admin("POST", f"/_failed/{uowId}/retry")
    assert status == 200 and retried["state"] == "queued", retried
    deadline = time.monotonic() + 10
    while [e["attempts"] for e in c.admin("GET", "/_failed")[1]["failed"]] != [2]:
        assert time.monotonic() < deadline, c.admin("GET", "/_failed")
        time.sleep(0.1)
    assert c.admin("GET", f"/_uow/{uowId}")[1]["failed"] is True
    status, dropped = c.admin("DELETE", f"/_failed/{uowId}")
    assert status == 200, dropped
    deadline = time.monotonic() + 10
    while listed() != [[]] * 3:
        assert time.monotonic() < deadline, listed()
        time.sleep(0.1)
    assert a.admin("GET", f"/_uow/{uowId}")[1]["state"] == "dropped"
    assert deployment.streamMessages() == 0


def test_tooLargeForTheStream(deployment: Deployment) -> None:
    """
    A body over the server's max_payload (1 MiB by default) is refused with
    413 naming the limit, and nothing is spooled.
    """
    instance = deployment.instances[0]
    instance_limits = instance.configPath.read_text().replace(
        "limits: {request_timeout_s: 5}", "limits: {request_timeout_s: 5, max_body_bytes: 4194304}"
    )
    instance.configPath.write_text(instance_limits)
    instance.kill(signal.SIGTERM)
    instance.start()
    status, _, body = instance.request("PUT", "/items/big", b"x" * (2 * 1024 * 1024))
    assert status == 413, body
    assert b"max_payload" in body
    assert deployment.streamMessages() == 0


@pytest.mark.process
def test_chaosKillingInstances(deployment: Deployment) -> None:
    """
    The bounded chaos run: six sequential writers round-robin across three
    instances while instances are SIGKILLed and restarted: no acknowledged
    write lost, the stores agree on every key, no key beyond its last sent
    version, nothing left in a fail queue or the stream.
    """
    seconds = float(os.environ.get("APICONTAINER_CHAOS_SECONDS", "20"))
    summary = chaos(deployment, seconds, writers=6, keys=3, seed=7, kill="instance")
    assert summary["kills"] >= 3 and summary["acked"] > 50, summary


@pytest.mark.process
def test_chaosKillingNATSServers(tmp_path: Path) -> None:
    """
    The same, while one NATS server at a time is SIGKILLed and restarted
    (a cluster of the test's own).
    """
    require("PostgreSQL", "127.0.0.1", 5432)
    require("Redis", *REDIS)
    requireJetStream()
    seconds = float(os.environ.get("APICONTAINER_CHAOS_SECONDS", "20"))
    with NATSCluster(tmp_path / "nats") as cluster:
        running = Deployment(tmp_path, cluster)
        running.start()
        try:
            summary = chaos(running, seconds, writers=6, keys=3, seed=11, kill="nats")
        finally:
            running.stop()
            running.cleanUp()
    assert summary["kills"] >= 3 and summary["acked"] > 50, summary


SHARED = """\
listen: "tcp:{port}:interface=127.0.0.1"
admin_listen: "tcp:{admin}:interface=127.0.0.1"
data_dir: {data}
spool: {{backend: jetstream, servers: ["nats://127.0.0.1:4222"], replicas: 1}}
stashes:
  %s
routes:
  - path: /items/<id>
    stashes: [records]
"""


def _refusal(tmp_path: Path, config: str, reactor: list[str]) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(config).format(port=0, admin=0, data=tmp_path / "var"))
    done = subprocess.run(
        [*TWIST, *reactor, "apicontainer", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 78, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_refusedOnAnotherReactor(tmp_path: Path) -> None:
    """
    The jetstream spool on twist's default reactor is refused at start, in
    one line that says what to type.
    """
    line = _refusal(tmp_path, SHARED % "records: {{type: redis, url: 'redis://127.0.0.1:6379/0'}}", [])
    assert line == (
        "apicontainer: spool.backend: jetstream needs the asyncio reactor: run"
        f" twist --reactor=asyncio apicontainer --config {tmp_path / 'config.yaml'}"
    )


def test_localStashRefused(tmp_path: Path) -> None:
    """
    A stash that keeps its data on this machine beside the jetstream spool
    is refused at start and by check-config, naming the stash.
    """
    config = SHARED % "records: {{type: sqlite, path: records.sqlite3}}"
    line = _refusal(tmp_path, config, ["--reactor=asyncio"])
    assert "stashes.records: a sqlite stash keeps data on this machine's disk" in line
    checked = subprocess.run(
        [str(Path(sys.executable).parent / "apicontainer"), "check-config", str(tmp_path / "config.yaml")],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 78 and "stashes.records: a sqlite stash" in checked.stderr, checked


def test_reloadKeepsTheCluster(deployment: Deployment) -> None:
    """
    A reload that changes the cluster's settings is refused (they need a
    restart) and changes nothing; one that does not is taken.
    """
    instance = deployment.instances[0]
    config = instance.configPath.read_text()
    instance.configPath.write_text(config.replace("partitions: 8", "partitions: 16"))
    status, answer = instance.admin("POST", "/_reload")
    assert status == 400 and "spool: changing it needs a restart" in answer["message"], answer
    instance.configPath.write_text(config.replace("retry: {initial_s: 0.2", "retry: {initial_s: 0.3"))
    assert instance.admin("POST", "/_reload")[0] == 200
    assert instance.request("PUT", "/items/after-reload", b"x")[0] == 200


def test_pastTheTimeoutAccepted(deployment: Deployment) -> None:
    """
    Past limits.request_timeout_s a write is answered 202 with its
    Location, and finishes all the same.
    """
    instance = deployment.instances[1]
    config = instance.configPath.read_text()
    instance.configPath.write_text(config.replace("request_timeout_s: 5", "request_timeout_s: 0.001"))
    assert instance.admin("POST", "/_reload")[0] == 200
    status, headers, body = instance.request("PUT", "/items/late", b"late")
    assert status == 202, body
    assert json.loads(body)["outcome"] == "pending" and headers["location"].startswith("/_uow/")
    deployment.settled()
    status, record = deployment.instances[2].admin("GET", headers["location"])
    assert status == 200 and record["state"] == "stored", record
    assert deployment.instances[0].request("GET", "/items/late")[2] == b"late"
