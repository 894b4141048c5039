"""
The random crash loop: clients write unique keys while the real server is
killed with SIGKILL at random moments and restarted; then a checker in the
manner of Jepsen's set checker compares what the clients were told with what
the stores hold.

    .venv/bin/python -m tests.chaos --cycles 300
    .venv/bin/python -m tests.chaos --cycles 300 --keys 20

prints one line of figures; tests/system/test_chaos.py runs a bounded form. With
C{--keys N} the clients write over N shared keys, each write a body of its
own, and the checker also looks for lost updates: a key left holding a write
older than one that a client sent after that write was acknowledged.
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

from .conftest import DEFAULT, RunningServer, holdsBytes

CONFIG = DEFAULT + "failqueue: {{retry: {{initial_s: 0.2, factor: 1, max_delay_s: 0.2, max_attempts: 1000}}}}\n"


@define
class Result:
    """
    What a run did and found.

    @ivar told: How many requests ended in each answer the clients got:
        C{acked} (200), C{queued} (5xx with a UOW), C{refused} (not
        spooled), C{unknown} (the connection died first).
    @ivar lost: Acknowledged writes missing from a store, or, on shared keys,
        overwritten by an older write.
    @ivar partial: Keys present in one store only, or holding different
        writes in the two stores, once quiet.
    @ivar unexpected: Keys present that no client sent, or with a body no
        client sent.
    @ivar unsettled: Writes told queued that never landed.
    @ivar unemptied: Files in C{spares/} that still held a request's bytes
        once the server had stopped.
    """

    cycles: int
    told: Counter[str] = field(factory=Counter)
    lost: list[str] = field(factory=list)
    partial: list[str] = field(factory=list)
    unexpected: list[str] = field(factory=list)
    unsettled: list[str] = field(factory=list)
    unemptied: list[str] = field(factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.partial or self.unexpected or self.unsettled or self.unemptied)

    def line(self) -> str:
        requests = sum(self.told.values())
        return (
            f"cycles={self.cycles} requests={requests} acked={self.told['acked']}"
            f" queued={self.told['queued']} refused={self.told['refused']}"
            f" unknown={self.told['unknown']} lost={len(self.lost)} partial={len(self.partial)}"
            f" unexpected={len(self.unexpected)} unsettled={len(self.unsettled)}"
            f" unemptied={len(self.unemptied)}"
            f" seconds={self.seconds:.0f}"
        )


@define
class Write:
    """
    One write a client sent: its key, the answer it got, and when it was
    sent and answered (monotonic seconds).
    """

    key: str
    answer: str
    sent: float
    answered: float


def _client(
    server: RunningServer, name: str, stop: threading.Event, told: dict[str, Write], keys: int
) -> None:
    """
    Write until stopped: each write a body of its own (C{name-n}), to a key
    of its own, or to one of C{keys} shared keys.
    """
    rng = random.Random(name)
    n = 0
    while not stop.is_set():
        n += 1
        body = f"/items/{name}-{n}"
        key = f"/items/k{rng.randrange(keys)}" if keys else body
        sent = time.monotonic()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            connection.request("PUT", key, body=body.encode())
            response = connection.getresponse()
            reply = json.loads(response.read() or b"{}")
            connection.close()
        except (OSError, http.client.HTTPException, ValueError):
            told[body] = Write(key, "unknown", sent, time.monotonic())
            stop.wait(0.02)
            continue
        if response.status == 200:
            answer = "acked"
        elif "uow" in reply:
            answer = "queued"
        else:
            answer = "refused"
        told[body] = Write(key, answer, sent, time.monotonic())


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


def run(
    directory: Path, cycles: int, clients: int = 4, seed: int = 0, report: bool = False, keys: int = 0
) -> Result:
    """
    Run C{cycles} kill-and-restart cycles, then settle and check.

    @param keys: Write over this many shared keys; by default each write
        has a key of its own.
    """
    rng = random.Random(seed)
    started = time.monotonic()
    server = RunningServer(directory, CONFIG)
    told: dict[str, Write] = {}
    for cycle in range(cycles):
        server.start()
        stop = threading.Event()
        threads = [
            threading.Thread(target=_client, args=(server, f"c{cycle}x{c}", stop, told, keys), daemon=True)
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
    result = Result(
        cycles=cycles, told=Counter(write.answer for write in told.values()), seconds=time.monotonic() - started
    )
    spares = server.dataDir / "spares"
    result.unemptied = sorted(p.name for p in spares.iterdir() if holdsBytes(p)) if spares.exists() else []
    check(result, told, records, files, keys)
    return result


def check(result: Result, told: dict[str, Write], records: dict[str, bytes], files: dict[str, bytes], keys: int) -> None:
    """
    Compare what the clients were told with what the two stores hold, once
    quiet, and add what is wrong to C{result}.
    """
    for body, write in sorted(told.items()):
        held = (records.get(write.key), files.get(write.key))
        if keys:
            # Shared keys: a write that landed may have been overwritten
            # since, but never by one older than itself.
            landed = all(held)
        else:
            landed = held == (body.encode(), body.encode())
        if write.answer == "acked" and not landed:
            result.lost.append(body)
        if write.answer == "queued" and not landed:
            result.unsettled.append(body)
    for key in sorted(set(records) | set(files)):
        if records.get(key) != files.get(key):
            result.partial.append(key)
            continue
        final = told.get(records[key].decode())
        if final is None or final.key != key or final.answer == "refused":
            result.unexpected.append(key)
            continue
        # A write is spooled, and gets its UOW id, before its answer: every
        # write to the key sent after this one's answer has a later id, and
        # if it landed (acked or queued) it must have won.
        for body, write in told.items():
            if write.key == key and write.sent > final.answered and write.answer in ("acked", "queued"):
                result.lost.append(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keys", type=int, default=0, help="write over this many shared keys")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="apicontainer-chaos-") as directory:
        result = run(Path(directory), args.cycles, args.clients, args.seed, report=True, keys=args.keys)
    print(result.line())
    for label in ("lost", "partial", "unexpected", "unsettled"):
        if getattr(result, label):
            print(f"{label}: {getattr(result, label)[:20]}")
    raise SystemExit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
