"""
What a request's timeouts cost the reactor thread.

    .venv/bin/python -m bench.timers

A request on the default config sets five timeouts (its own, and one per
stash call and per commit on each of its two stashes), which all but never
expire. This times, on the real reactor and with the CPU clock, batches of
32 requests whose five Deferreds each get a timeout of 30 seconds and then
fire, as under load: with C{Deferred.addTimeout} (a timer each), with
L{apicontainer.pipeline._deadlines.Deadlines} (one timer), and with no timeout at all
(the same Deferreds, the baseline of the same run). The reactor's heap holds
64 other timers meanwhile, as it does for the connections of a loaded
server.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred

from apicontainer.pipeline._deadlines import Deadlines

BATCH = 32  # requests in flight, as in the headline case
TIMEOUTS = 5  # per request on the default config
ROUNDS = 2000  # batches a run


def perRequest(kind: str, rounds: int) -> float:
    """
    CPU seconds per request: C{rounds} batches whose Deferreds get a
    timeout of C{kind} and then fire.
    """
    deadlines = Deadlines(reactor)
    started = time.process_time()
    for _ in range(rounds):
        calls: list[Deferred[None]] = [Deferred() for _ in range(BATCH * TIMEOUTS)]
        for call in calls:
            if kind == "addTimeout":
                call.addTimeout(30, reactor)
            elif kind == "Deadlines":
                deadlines.watch(call, 30)
        reactor.runUntilCurrent()  # as between reactor iterations: new timers go onto the heap
        for call in calls:
            call.callback(None)
        reactor.runUntilCurrent()
    return (time.process_time() - started) / (rounds * BATCH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"batches a run (default {ROUNDS})")
    rounds = parser.parse_args().rounds
    others = [reactor.callLater(3600 + i, lambda: None) for i in range(64)]
    kinds = ("no timeout", "addTimeout", "Deadlines")
    runs: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(5):  # interleaved, so that a slow spell of the machine hits all three
        for kind in kinds:
            gc.collect()
            runs[kind].append(perRequest(kind, rounds))
    base = statistics.median(runs["no timeout"])
    print(f"{TIMEOUTS} timeouts per request, {BATCH} requests in flight, median of 5 runs each")
    for kind in kinds:
        cost = statistics.median(runs[kind])
        extra = "" if kind == "no timeout" else f", {1e6 * (cost - base):.1f} us more than no timeout"
        print(f"  {kind:10}  {1e6 * cost:6.1f} us per request ({cost / base:.1f}x no timeout{extra})")
    for call in others:
        call.cancel()


if __name__ == "__main__":
    main()
