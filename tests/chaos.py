"""
The random crash loop: clients write unique keys while the real server is
killed with SIGKILL at random moments and restarted; then a checker in the
manner of Jepsen's set checker compares what the clients were told with what
the stores hold.

    .venv/bin/python -m tests.chaos --cycles 300

prints one line of figures; tests/test_chaos.py runs a bounded form.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from attrs import define, field

from .conftest import DEFAULT, RunningServer

CONFIG = DEFAULT + "failqueue: {{retry: {{initial_s: 0.2, factor: 1, max_delay_s: 0.2, max_attempts: 1000}}}}\n"


@define
class Result:
    """
    What a run did and found.

    @ivar told: How many requests ended in each answer the clients got:
        C{acked} (200), C{queued} (5xx with a UOW), C{refused} (not
        spooled), C{unknown} (the connection died first).
    @ivar lost: Acknowledged writes missing from a store.
    @ivar partial: Keys present in one store only, once quiet.
    @ivar unexpected: Keys present that no client sent, or with a body no
        client sent.
    @ivar unsettled: Writes told queued that never landed.
    """

    cycles: int
    told: Counter[str] = field(factory=Counter)
    lost: list[str] = field(factory=list)
    partial: list[str] = field(factory=list)
    unexpected: list[str] = field(factory=list)
    unsettled: list[str] = field(factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.partial or self.unexpected or self.unsettled)

    def line(self) -> str:
        requests = sum(self.told.values())
        return (
            f"cycles={self.cycles} requests={requests} acked={self.told['acked']}"
            f" queued={self.told['queued']} refused={self.told['refused']}"
            f" unknown={self.told['unknown']} lost={len(self.lost)} partial={len(self.partial)}"
            f" unexpected={len(self.unexpected)} unsettled={len(self.unsettled)}"
            f" seconds={self.seconds:.0f}"
        )


def _client(server: RunningServer, name: str, stop: threading.Event, told: dict[str, str]) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        key = f"/items/{name}-{n}"
        try:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            connection.request("PUT", key, body=key.encode())
            response = connection.getresponse()
            body = json.loads(response.read() or b"{}")
            connection.close()
        except (OSError, http.client.HTTPException, ValueError):
            told[key] = "unknown"
            stop.wait(0.02)
            continue
        if response.status == 200:
            told[key] = "acked"
        elif "uow" in body:
            told[key] = "queued"
        else:
            told[key] = "refused"


def _quiet(server: RunningServer, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        failed = server.admin("GET", "/_failed")[1]["failed"]
        if not failed and not os.listdir(server.dataDir / "spool"):
            return
        time.sleep(0.1)
    raise RuntimeError("the server did not settle within the timeout")


def _stores(server: RunningServer) -> tuple[dict[str, bytes], dict[str, bytes]]:
    db = sqlite3.connect(server.dataDir / "records.sqlite3")
    try:
        records = {k: bytes(b) for k, b in db.execute("SELECT key, body FROM documents WHERE body IS NOT NULL")}
    finally:
        db.close()
    files = {}
    items = server.dataDir / "files" / "items"
    if items.exists():
        for pointer in items.glob("*.doc"):
            files["/items/" + pointer.name[: -len(".doc")]] = pointer.read_bytes()
    return records, files


def run(directory: Path, cycles: int, clients: int = 4, seed: int = 0, report: bool = False) -> Result:
    """
    Run C{cycles} kill-and-restart cycles, then settle and check.
    """
    rng = random.Random(seed)
    started = time.monotonic()
    server = RunningServer(directory, CONFIG)
    told: dict[str, str] = {}
    for cycle in range(cycles):
        server.start()
        stop = threading.Event()
        threads = [
            threading.Thread(target=_client, args=(server, f"c{cycle}x{c}", stop, told), daemon=True)
            for c in range(clients)
        ]
        for thread in threads:
            thread.start()
        time.sleep(rng.uniform(0.05, 0.5))
        server.kill(signal.SIGKILL)
        stop.set()
        for thread in threads:
            thread.join(15)
        if report and (cycle + 1) % 10 == 0:
            print(f"cycle {cycle + 1}: {len(told)} requests so far", flush=True)
    server.start()
    try:
        _quiet(server)
        records, files = _stores(server)
    finally:
        server.kill(signal.SIGTERM)
    result = Result(cycles=cycles, told=Counter(told.values()), seconds=time.monotonic() - started)
    for key, answer in sorted(told.items()):
        inRecords, inFiles = key in records, key in files
        if answer == "acked" and not (inRecords and inFiles):
            result.lost.append(key)
        if answer == "queued" and not (inRecords and inFiles):
            result.unsettled.append(key)
    for key in sorted(set(records) ^ set(files)):
        result.partial.append(key)
    for key in sorted(set(records) | set(files)):
        if key not in told or records.get(key, key.encode()) != key.encode() or files.get(key, key.encode()) != key.encode():
            result.unexpected.append(key)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="apicontainer-chaos-") as directory:
        result = run(Path(directory), args.cycles, args.clients, args.seed, report=True)
    print(result.line())
    for label in ("lost", "partial", "unexpected", "unsettled"):
        if getattr(result, label):
            print(f"{label}: {getattr(result, label)[:20]}")
    raise SystemExit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
