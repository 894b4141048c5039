"""
Count the work the reactor thread does per request.

    .venv/bin/python -m bench.count [--seconds 8] [--concurrency 32] [--stashes 2]

Starts the real server on the config of a bench.run case, and then the
Klein app of bench.baseline for comparison, each under a wrapper
that counts, on the reactor's thread only (the thread pools and the child
processes are not counted): Python function calls, calls of built-in
functions, Deferreds made, callbacks added to Deferreds, log events
emitted, and JSON encodings. It warms the server up, resets the
counts, drives it with wrk, and divides what was counted by the requests
answered. Counting slows the server down many times over, so its req/s
mean nothing; the counts per request are what it is for.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .run import HERE, config, freePort, waitFor, wrk


def _counted(what: str, argument: str, out: str) -> None:
    """
    Run C{twist apicontainer --config argument} (C{what} is C{server}), or
    the Klein app of bench.baseline on port C{argument} (C{baseline}), in
    this process, counting; SIGUSR1 resets the counts, SIGUSR2 writes them
    to C{out} as JSON.
    """
    import threading

    from twisted.application.twist._twist import Twist
    from twisted.internet import defer
    from twisted.logger import globalLogPublisher

    from apicontainer import _compactjson

    counts = {"calls": 0, "builtin_calls": 0, "deferreds": 0, "callbacks": 0, "log_events": 0, "json_encodes": 0}
    reactorThread = threading.get_ident()

    ours: set[Any] = set()  # the code of the counting wrappers, not counted

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            if frame.f_code not in ours:
                counts["calls"] += 1
        elif event == "c_call":
            counts["builtin_calls"] += 1

    originalInit = defer.Deferred.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        if threading.get_ident() == reactorThread:
            counts["deferreds"] += 1
        originalInit(self, *args, **kwargs)

    defer.Deferred.__init__ = init  # type: ignore[method-assign]
    for method in ("addCallbacks", "addCallback", "addErrback", "addBoth"):
        original = getattr(defer.Deferred, method)

        def adding(self: Any, *args: Any, __original: Any = original, **kwargs: Any) -> Any:
            if threading.get_ident() == reactorThread:
                counts["callbacks"] += 1
            return __original(self, *args, **kwargs)

        setattr(defer.Deferred, method, adding)

    def observe(event: Any) -> None:
        if threading.get_ident() == reactorThread:
            counts["log_events"] += 1

    globalLogPublisher.addObserver(observe)
    for module, name in ((json, "dumps"), (_compactjson, "compact")):
        original = getattr(module, name)

        def counting(*args: Any, __original: Any = original, **kwargs: Any) -> Any:
            if threading.get_ident() == reactorThread:
                counts["json_encodes"] += 1
            return __original(*args, **kwargs)

        setattr(module, name, counting)

    def reset(signum: int, frame: Any) -> None:
        for name in counts:
            counts[name] = 0

    def dump(signum: int, frame: Any) -> None:
        Path(out).write_text(json.dumps(counts))

    ours.update(f.__code__ for f in (init, adding, observe, counting))
    signal.signal(signal.SIGUSR1, reset)
    signal.signal(signal.SIGUSR2, dump)
    sys.setprofile(profile)
    if what == "server":
        Twist.main(["twist", "apicontainer", "--config", argument])
        return
    from twisted.internet import endpoints, reactor
    from twisted.web.server import Site

    from .baseline import Baseline

    endpoints.serverFromString(reactor, f"tcp:{argument}:interface=127.0.0.1").listen(Site(Baseline().app.resource()))
    reactor.run()  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--stashes", type=int, default=2)
    parser.add_argument("--body", type=int, default=1024)
    parser.add_argument("--run", nargs=3, metavar=("WHAT", "ARGUMENT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        _counted(*args.run)
        return
    rows = {}
    with tempfile.TemporaryDirectory(prefix="apicontainer-count-") as work:
        port, admin = freePort(), freePort()
        configPath = Path(work) / "config.yaml"
        configPath.write_text(config(port, admin, Path(work) / "var", args.stashes, False))
        rows["api-container"] = count(["server", str(configPath)], port, Path(work) / "server.json", args)
        port = freePort()
        rows["Klein app that stores nothing"] = count(["baseline", str(port)], port, Path(work) / "baseline.json", args)
    print(f"c={args.concurrency} body={args.body} stashes={args.stashes}, per request on the reactor's thread:")
    names = list(rows["api-container"])
    print("| system | " + " | ".join(name.replace("_", " ") for name in names) + " |")
    print("| --- |" + " ---: |" * len(names))
    for system, counts in rows.items():
        print(f"| {system} | " + " | ".join(f"{counts[name]:.1f}" for name in names) + " |")


def count(run: list[str], port: int, out: Path, args: argparse.Namespace) -> dict[str, float]:
    """
    Start a counted process (see L{_counted}), load it, and give its counts
    per request answered.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.count", "--run", *run, str(out)],
        cwd=HERE.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        waitFor(port, timeout=60)
        wrk(port, args.concurrency, 2.0, args.body, 0)
        process.send_signal(signal.SIGUSR1)
        result = wrk(port, args.concurrency, args.seconds, args.body, 0)
        process.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not out.exists():
            if time.monotonic() > deadline:
                raise SystemExit("bench.count: the counted process wrote no counts")
            time.sleep(0.1)
        counts = json.loads(out.read_text())
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    requests = max(1, int(result["requests"]))
    return {name: value / requests for name, value in counts.items()}


if __name__ == "__main__":
    main()
