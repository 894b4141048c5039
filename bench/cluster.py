"""
The cluster case: 1, 2 and 3 instances on a 3-node JetStream cluster
(spool and fail queue on JetStream, PostgreSQL and Redis stashes), beside
one instance on the file spool with the same stashes, in the same run.

    python -m bench.cluster [--seconds 10] [--concurrency 32] [--body 1024]

wrk drives every instance at once (the concurrency split between them);
req/s is their sum, p99 the worst instance's. CPU per request is given for
the instances (with their child processes) and for the NATS servers; the
PostgreSQL and Redis servers are not counted. Publish latency is the mean time the stream
took to acknowledge a UOW (the instances' apicontainer_publish_seconds).
On two cores the instances and the servers share the same cores: read the
CPU per request, not req/s, for what another machine would add.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from apicontainer.testing import NATSCluster
from bench.run import TWIST, cpuSeconds, freePort, waitFor, wrk

POSTGRES = "host=127.0.0.1 port=5432 dbname=test user=postgres"

CONFIG = """\
listen: "tcp:{port}:interface=127.0.0.1"
admin_listen: "tcp:{admin}:interface=127.0.0.1"
data_dir: {data}
limits: {{max_in_flight: 4096}}
{spool}
stashes:
  catalog: {{type: postgres, dsn: "{dsn}", table: {table}}}
  cache: {{type: redis, url: "redis://127.0.0.1:6379/0", prefix: "{prefix}"}}
routes:
  - path: /items/<id>
    stashes: [catalog, cache]
"""


def _spool(urls: list[str], stream: str) -> str:
    return (
        f"spool: {{backend: jetstream, servers: [{', '.join(repr(u) for u in urls)}], stream: {stream}, replicas: 3}}\n"
        "failqueue: {backend: jetstream}"
    )


def _instances(work: Path, count: int, spool: str, table: str, prefix: str, reactor: list[str]) -> list[dict[str, Any]]:
    started = []
    for n in range(count):
        home = work / f"i{n}-{uuid.uuid4().hex[:6]}"
        home.mkdir(parents=True)
        port, admin = freePort(), freePort()
        (home / "config.yaml").write_text(
            CONFIG.format(port=port, admin=admin, data=home / "var", spool=spool, dsn=POSTGRES, table=table, prefix=prefix)
        )
        process = subprocess.Popen(
            [TWIST, *reactor, "apicontainer", "--config", str(home / "config.yaml")],
            cwd=home, stdout=(home / "server.log").open("wb"), stderr=subprocess.STDOUT,
        )
        started.append({"process": process, "port": port, "admin": admin})
    try:
        for instance in started:
            waitFor(instance["port"])
    except BaseException:
        _stop(started)  # none is left running when one did not start
        raise
    return started


def _publishSeconds(admin: int) -> tuple[float, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    total = re.search(r"^apicontainer_publish_seconds_sum ([\d.e+-]+)$", text, re.M)
    count = re.search(r"^apicontainer_publish_seconds_count ([\d.e+-]+)$", text, re.M)
    return (float(total[1]), float(count[1])) if total and count else (0.0, 0.0)


def measure(instances: list[dict[str, Any]], servers: list[int], concurrency: int, seconds: float, body: int) -> dict[str, Any]:
    share = max(1, concurrency // len(instances))
    for instance in instances:
        wrk(instance["port"], share, 1.0, body, 0)  # warm up
    pids = [instance["process"].pid for instance in instances]
    before = sum(cpuSeconds(pid) for pid in pids)
    serversBefore = sum(cpuSeconds(pid) for pid in servers)
    published = [_publishSeconds(i["admin"]) for i in instances] if servers else []
    results: list[dict[str, float]] = []

    def drive(port: int) -> None:
        results.append(wrk(port, share, seconds, body, 0))

    threads = [threading.Thread(target=drive, args=(i["port"],)) for i in instances]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    requests = sum(r["requests"] for r in results)
    cpu = sum(cpuSeconds(pid) for pid in pids) - before
    serversCPU = sum(cpuSeconds(pid) for pid in servers) - serversBefore
    latency = None
    if servers:
        after = [_publishSeconds(i["admin"]) for i in instances]
        spent = sum(a[0] - b[0] for a, b in zip(after, published))
        count = sum(a[1] - b[1] for a, b in zip(after, published))
        latency = 1000 * spent / max(1, count)
    return {
        "instances": len(instances),
        "rps": sum(r["rps"] for r in results),
        "p99": max(r["p99"] for r in results),
        "non2xx": sum(r["non2xx"] for r in results),
        "cpu_ms": 1000 * cpu / max(1, requests),
        "nats_cpu_ms": 1000 * serversCPU / max(1, requests),
        "publish_ms": latency,
    }


def _stop(instances: list[dict[str, Any]]) -> None:
    for instance in instances:
        instance["process"].send_signal(signal.SIGKILL)
        instance["process"].wait()


def _dropStores(table: str, prefix: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES, autocommit=True) as db:
        db.execute(f'DROP TABLE IF EXISTS "{table}", "{table}_undo", "{table}_numbering"')
    keys = subprocess.run(["redis-cli", "--scan", "--pattern", f"{prefix}*"], capture_output=True, text=True).stdout.split()
    for start in range(0, len(keys), 1000):
        subprocess.run(["redis-cli", "del", *keys[start : start + 1000]], capture_output=True)


def rawPublishes(urls: list[str], servers: list[int], body: int, seconds: float = 5.0) -> dict[str, float]:
    """
    The cluster alone: 32 clients publishing C{body}-byte messages to an R3
    stream as fast as its acknowledgements come back.
    """
    import asyncio

    import nats
    from nats.js.api import StreamConfig

    async def publishing() -> dict[str, float]:
        connection = await nats.connect(urls)
        js = connection.jetstream()
        await js.add_stream(StreamConfig(name="RAW", subjects=["RAW.>"], num_replicas=3))
        count = 0
        deadline = time.monotonic() + seconds

        async def client(n: int) -> None:
            nonlocal count
            while time.monotonic() < deadline:
                await js.publish(f"RAW.{n}", b"x" * body)
                count += 1

        before = sum(cpuSeconds(pid) for pid in servers)
        started = time.monotonic()
        await asyncio.gather(*(client(n) for n in range(32)))
        elapsed = time.monotonic() - started
        cpu = sum(cpuSeconds(pid) for pid in servers) - before
        await js.delete_stream("RAW")
        await connection.close()
        return {"rps": count / elapsed, "nats_cpu_ms": 1000 * cpu / max(1, count)}

    return asyncio.run(publishing())


def run(seconds: float, concurrency: int, body: int) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-cluster-", ignore_cleanup_errors=True) as directory:
        work = Path(directory)
        table, prefix = f"bench_{uuid.uuid4().hex[:8]}", f"bench-{uuid.uuid4().hex[:8]}:"
        single = _instances(work, 1, "", table, prefix, [])
        try:
            results.append({"setup": "file spool, 1 instance", **measure(single, [], concurrency, seconds, body)})
        finally:
            _stop(single)
            _dropStores(table, prefix)
        with NATSCluster(work / "nats") as cluster:
            servers = [p.pid for p in cluster._processes if p is not None]
            raw = rawPublishes(cluster.urls, servers, body)
            print(
                f"raw replicated publishes: {raw['rps']:.0f} a second,"
                f" {raw['nats_cpu_ms']:.2f} ms of the servers' CPU each",
                flush=True,
            )
            for count in (1, 2, 3):
                table, prefix = f"bench_{uuid.uuid4().hex[:8]}", f"bench-{uuid.uuid4().hex[:8]}:"
                spool = _spool(cluster.urls, f"B{uuid.uuid4().hex[:8]}")
                instances = _instances(work, count, spool, table, prefix, ["--reactor=asyncio"])
                try:
                    time.sleep(1)
                    results.append(
                        {"setup": f"jetstream, {count} instance{'s' if count > 1 else ''}", **measure(instances, servers, concurrency, seconds, body)}
                    )
                finally:
                    _stop(instances)
                    _dropStores(table, prefix)
    return results


def table(results: list[dict[str, Any]]) -> str:
    base = results[0]["rps"]
    lines = [
        "| setup | req/s | x file spool | p99 ms | instances' CPU ms/req | NATS servers' CPU ms/req | publish ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        publish = f"{r['publish_ms']:.2f}" if r["publish_ms"] is not None else "-"
        lines.append(
            f"| {r['setup']} | {r['rps']:.0f} | {r['rps'] / base:.2f} | {r['p99']:.1f} | {r['cpu_ms']:.2f}"
            f" | {r['nats_cpu_ms']:.2f} | {publish} |".replace(" | 0.00 | - |", " | - | - |")
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--body", type=int, default=1024)
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    options = parser.parse_args()
    results = run(options.seconds, options.concurrency, options.body)
    print(table(results))
    if options.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
