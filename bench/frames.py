"""
What the frames between the server and its child processes cost, with
their heads in marshal's format or in JSON.

    .venv/bin/python -m bench.frames [--requests 20000] [--rounds 3]

A request on the default config makes four calls to the children and reads
four answers: its spool write and its final state (the journal), its store
and its commit (the filesystem stash). Each frame is written once and read
once, one end on the server's reactor and the other in a child. This times,
with the process's CPU clock, all eight frames of a request made and read
back (L{apicontainer.storage._childprotocol.frame} and C{frames}), for a UOW with a
1 KiB body:

  - C{marshal}: as the server does it;
  - C{json}: as it did before, the heads as compact UTF-8 JSON.

Both go through the server's own C{frame} and C{frames}, with the head
written and read each way.

The two alternate, C{--rounds} times each.
"""

from __future__ import annotations

import argparse
import json
import marshal
import time
from typing import Any

from apicontainer.storage import _childprotocol as childprocess
from apicontainer._compactjson import compact
from apicontainer.storage._journal import _recordFields
from apicontainer.storage._states import StateRecord
from apicontainer.testing import contractUOW
from apicontainer.uow import Report, Status, Verdict


def _calls() -> list[tuple[dict[str, Any], bytes]]:
    """
    The heads and bodies of a request's calls and answers.
    """
    uow = contractUOW(123456, b"x" * 1024, key="/items/5f0c2a9e-t0-12345")
    head, body = childprocess.encodeUOW(uow)
    bare, _ = childprocess.encodeUOW(uow, withBody=False)
    verdicts = {"s0": Verdict.stored(), "s1": Verdict.stored()}
    record = StateRecord.of(Status.stored, Report.fromVerdicts(uow, verdicts), uow.route, time.time(), uow)
    return [
        ({"op": "spool", "uow": head}, body),
        ({"ok": True}, b""),
        ({"op": "stash", "uow": head}, body),
        ({"ok": True, "verdict": Verdict.stored().asJSON()}, b""),
        ({"op": "commit", "uow": bare}, b""),
        ({"ok": True, "none": True}, b""),
        ({"op": "state", "record": _recordFields(record), "remove": True}, b""),
        ({"ok": True}, b""),
    ]


def _jsonHead(head: dict[str, Any]) -> bytes:
    # The heads as they were: compact UTF-8 JSON.
    return compact(head).encode("utf-8")


WAYS = {"json": (_jsonHead, json.loads), "marshal": (marshal.dumps, marshal.loads)}


def measure(kind: str, requests: int) -> float:
    """
    CPU microseconds to make and read back the eight frames of a request.
    """
    calls = _calls()
    dumps, loads = WAYS[kind]
    frame, frames = childprocess.frame, childprocess.frames
    for head, body in calls:  # each way reads back what it made
        assert list(frames(bytearray(frame(head, body, dumps)), loads)) == [(head, body)], kind
    started = time.process_time()
    for _ in range(requests):
        for head, body in calls:
            for _ in frames(bytearray(frame(head, body, dumps)), loads):
                pass
    return 1e6 * (time.process_time() - started) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    totals: dict[str, list[float]] = {"json": [], "marshal": []}
    for n in range(options.rounds):
        for kind in ("json", "marshal"):
            totals[kind].append(measure(kind, options.requests))
            print(f"round {n + 1} {kind:7s}: {totals[kind][-1]:5.1f} us a request (CPU, 8 frames)", flush=True)
    json_, marshal_ = (sorted(totals[kind])[len(totals[kind]) // 2] for kind in ("json", "marshal"))
    print(f"median CPU a request: json {json_:.1f} us, marshal {marshal_:.1f} us ({marshal_ / json_:.2f}x)")


if __name__ == "__main__":
    main()
