"""
Several instances of the real server on one JetStream cluster, with
PostgreSQL and Redis stashes, and the chaos loop that writes through them
while instances and NATS servers die.

Run the long form by hand:

    python -m tests.jscluster --seconds 120 --writers 6 --keys 3 --seed 1 --kill instance
    python -m tests.jscluster --seconds 120 --kill nats

The test suite runs a bounded form of each (tests/system/test_jetstream.py).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import RunningServer
from tests.services import POSTGRES_DSN, REDIS, dropStores

CONFIG = """\
listen: "tcp:{port}:interface=127.0.0.1"
admin_listen: "tcp:{admin}:interface=127.0.0.1"
data_dir: {data}
limits: {{request_timeout_s: 5}}
spool:
  backend: jetstream
  servers: [%(servers)s]
  stream: %(stream)s
  partitions: %(partitions)d
  replicas: 3
  ack_wait_s: 2
failqueue:
  backend: jetstream
  retry: {{initial_s: 0.2, max_delay_s: 1}}
stashes:
  catalog: {{type: postgres, dsn: "%(dsn)s", table: %(table)s}}
  cache: {{type: redis, url: "redis://%(redis)s/0", prefix: "%(prefix)s"}}
%(down)sroutes:
  - path: /items/<id>
    stashes: [catalog, cache]
    read: [catalog]
%(downRoute)s"""

# A stash whose database is down, on a route of its own: its UOWs fail.
DOWN = '  down: {{type: postgres, dsn: "host=127.0.0.1 port=9 dbname=x user=postgres connect_timeout=1", table: d}}\n'
DOWN_ROUTE = "  - path: /down/<id>\n    stashes: [catalog, down]\n"


class Deployment:
    """
    C{size} instances on C{cluster}, on a stream, table and prefix of their
    own.
    """

    def __init__(
        self, directory: Path, cluster: Any, size: int = 3, partitions: int = 8, failing: bool = False
    ) -> None:
        """
        @param failing: Add the route C{/down/<id>}, whose UOWs fail.
        """
        self.directory = directory
        self.cluster = cluster
        self.stream = f"S{uuid.uuid4().hex[:10]}"
        self.table = f"t_{uuid.uuid4().hex[:12]}"
        self.prefix = f"test-{uuid.uuid4().hex[:10]}:"
        config = CONFIG % {
            "servers": ", ".join(cluster.urls),
            "stream": self.stream,
            "partitions": partitions,
            "dsn": POSTGRES_DSN,
            "table": self.table,
            "redis": f"{REDIS[0]}:{REDIS[1]}",
            "prefix": self.prefix,
            "down": DOWN if failing else "",
            "downRoute": DOWN_ROUTE if failing else "",
        }
        self.instances = []
        for i in range(size):
            home = directory / f"i{i}"
            home.mkdir(parents=True, exist_ok=True)
            self.instances.append(RunningServer(home, config, reactor="asyncio"))

    def start(self) -> None:
        for instance in self.instances:
            instance.start()

    def stop(self) -> None:
        for instance in self.instances:
            instance.kill(signal.SIGTERM)

    def cleanUp(self) -> None:
        dropStores(self.table, self.prefix)

    # What the stores and the cluster hold.

    def postgres(self) -> dict[str, bytes]:
        import psycopg

        with psycopg.connect(POSTGRES_DSN) as db:
            rows = db.execute(f'SELECT key, body FROM "{self.table}" WHERE body IS NOT NULL').fetchall()
        return {key.removeprefix("/items/"): bytes(body) for key, body in rows}

    def redis(self, keys: list[str]) -> dict[str, bytes]:
        found = {}
        cli = ["redis-cli", "-h", REDIS[0], "-p", str(REDIS[1]), "--raw"]
        for key in keys:
            out = subprocess.run([*cli, "hget", f"{self.prefix}doc:/items/{key}", "body"], capture_output=True)
            if out.stdout.strip():
                found[key] = out.stdout.strip()
        return found

    def streamMessages(self) -> int:
        """
        Messages in the stream: UOWs not yet final (and any left behind).
        """
        for monitor in self.cluster.monitors:
            try:
                with urllib.request.urlopen(f"{monitor}/jsz?streams=true", timeout=5) as answer:
                    report = json.load(answer)
            except OSError:
                continue
            for account in report.get("account_details", []):
                for stream in account.get("stream_detail", []):
                    if stream["name"] == self.stream:
                        return int(stream["state"]["messages"])
        raise RuntimeError(f"no server reports stream {self.stream}")

    def settled(self, timeout: float = 60) -> dict[str, Any]:
        """
        Wait until every instance is idle, every fail queue empty and the
        stream empty; then say what each holds.
        """
        deadline = time.monotonic() + timeout
        while True:
            state = {"messages": self.streamMessages(), "instances": []}
            for instance in self.instances:
                _, health = instance.admin("GET", "/_health")
                _, failed = instance.admin("GET", "/_failed")
                state["instances"].append(
                    {"in_flight": health["in_flight"], "unsettled": health["unsettled"], "failed": len(failed["failed"])}
                )
            idle = all(not (i["in_flight"] or i["unsettled"] or i["failed"]) for i in state["instances"])
            if idle and state["messages"] == 0:
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"not settled after {timeout}s: {state}")
            time.sleep(0.5)


@dataclass
class Writer:
    """
    A client that writes versions 1, 2, 3... of its keys in turn, each until
    it is answered 200, round-robin across instances, resending with the
    same Idempotency-Key after any error.
    """

    name: str
    keys: list[str]
    ports: list[int]
    sent: dict[str, int] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)

    def run(self, stop: threading.Event) -> None:
        turn = 0
        while not stop.is_set():
            for key in self.keys:
                version = self.sent.get(key, 0) + 1
                self.sent[key] = version
                body = json.dumps({"writer": self.name, "key": key, "v": version}).encode()
                idempotency = f"{self.name}-{key}-{version}"
                while True:
                    port = self.ports[turn % len(self.ports)]
                    turn += 1
                    status = self._put(port, key, body, idempotency)
                    self.requests += 1
                    self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
                    if status == 200:
                        self.acked[key] = version
                        break
                    if status not in (0, 202, 409, 503):
                        self.unexpected.append(f"{key} v{version}: {status}")
                    time.sleep(0.1)
                if stop.is_set():
                    return

    def _put(self, port: int, key: str, body: bytes, idempotency: str) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        try:
            connection.request(
                "PUT", f"/items/{key}", body=body,
                headers={"Content-Type": "application/json", "Idempotency-Key": idempotency},
            )
            response = connection.getresponse()
            response.read()
            return response.status
        except OSError:
            return 0  # refused or cut: the instance is down
        finally:
            connection.close()


def chaos(
    deployment: Deployment,
    seconds: float,
    writers: int,
    keys: int,
    seed: int,
    kill: str,
) -> dict[str, Any]:
    """
    Write for C{seconds} while an instance (C{kill="instance"}) or a NATS
    server (C{kill="nats"}) is killed with SIGKILL and restarted, over and
    over; then check what the stores hold.

    @return: A summary; it raises L{AssertionError} on any lost, torn or
        diverging write.
    """
    rng = random.Random(seed)
    ports = [instance.port for instance in deployment.instances]
    clients = [
        Writer(f"w{n}", [f"w{n}k{k}" for k in range(keys)], ports[n % len(ports):] + ports[: n % len(ports)])
        for n in range(writers)
    ]
    stop = threading.Event()
    threads = [threading.Thread(target=client.run, args=(stop,), daemon=True) for client in clients]
    for thread in threads:
        thread.start()
    kills = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(1.0, 2.5))
        if time.monotonic() >= deadline:
            break
        if kill == "instance":
            victim = rng.randrange(len(deployment.instances))
            deployment.instances[victim].kill(signal.SIGKILL)
            time.sleep(rng.uniform(0.2, 1.0))
            deployment.instances[victim].start()
        elif kill == "nats":
            victim = rng.randrange(deployment.cluster.size)
            deployment.cluster.kill(victim)
            time.sleep(rng.uniform(1.0, 3.0))
            deployment.cluster.start(victim)
        kills += 1
    stop.set()
    for thread in threads:
        thread.join(120)
        assert not thread.is_alive(), "a writer is stuck"
    state = deployment.settled()
    sent = {key: version for client in clients for key, version in client.sent.items()}
    acked = {key: version for client in clients for key, version in client.acked.items()}
    postgres = deployment.postgres()
    redis = deployment.redis(list(sent))
    lost, diverged, beyond = [], [], []
    for key, version in sent.items():
        stored = json.loads(postgres[key])["v"] if key in postgres else 0
        cached = json.loads(redis[key])["v"] if key in redis else 0
        if stored < acked.get(key, 0):
            lost.append(f"{key}: stored v{stored} < acked v{acked[key]}")
        if stored > version:
            beyond.append(f"{key}: stored v{stored} > sent v{version}")
        if stored != cached:
            diverged.append(f"{key}: postgres v{stored}, redis v{cached}")
    statuses: dict[str, int] = {}
    for client in clients:
        for status, n in client.statuses.items():
            statuses[status] = statuses.get(status, 0) + n
    summary = {
        "kill": kill,
        "kills": kills,
        "requests": sum(client.requests for client in clients),
        "acked": sum(acked.values()),
        "statuses": statuses,
        "lost": lost,
        "diverged": diverged,
        "beyond": beyond,
        "unexpected": [u for client in clients for u in client.unexpected],
        "settled": state,
    }
    assert not (lost or diverged or beyond or summary["unexpected"]), summary
    return summary


def main() -> None:  # pragma: no cover - the long form, by hand
    from apicontainer.testing import NATSCluster

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--writers", type=int, default=6)
    parser.add_argument("--keys", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kill", choices=["instance", "nats", "none"], default="instance")
    options = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="apicontainer-jschaos-"))
    with NATSCluster(directory / "nats") as cluster:
        deployment = Deployment(directory, cluster)
        deployment.start()
        try:
            summary = chaos(deployment, options.seconds, options.writers, options.keys, options.seed, options.kill)
        finally:
            deployment.stop()
            deployment.cleanUp()
    json.dump(summary, sys.stdout, indent=1)
    print()


if __name__ == "__main__":  # pragma: no cover
    main()
