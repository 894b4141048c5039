"""
The pipeline without HTTP: how fast the server settles writes when no
request has to be parsed or answered.

    .venv/bin/python -m bench.pipeline [--seconds 8] [--concurrency 32] [--rounds 3]

Each round measures, on the config of bench.run's c=32, 1 KiB, 2-stash case
and in data directories of their own, first the real server over HTTP (as
bench.run does), then the same server's pipeline driven from inside its
process: C{--concurrency} writes kept under way, each a 1 KiB UOW handed to
C{Container.submit} as ingress hands it, the next one sent when it is
answered. What the second does beyond the first bounds what taking HTTP off
the process that runs the pipeline (ingress processes of their own) can
give on this machine: the HTTP work moves to other processes, it does not
vanish.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .run import config, cpuSeconds, freePort, server

HERE = Path(__file__).parent


def _drive(configPath: str, concurrency: int, seconds: float, out: str) -> None:
    """
    In this process: start the server of C{configPath} on the default
    reactor, warm it up for a second, keep C{concurrency} UOWs under way for
    C{seconds}, and write what was settled (and the time it took) to C{out}.
    """
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from apicontainer.server._tap import Options, makeService
    from apicontainer.uow import UnitOfWork

    options = Options()
    options.parseOptions(["--config", configPath])
    root = makeService(options)
    service = next(iter(root))  # type: ignore[call-overload]
    body = json.dumps({"pad": "x" * 1012}).encode()  # 1 KiB
    counts = {"settled": 0, "failed": 0}
    state: dict[str, Any] = {"counting": False, "stop": False, "n": 0}

    async def writer() -> None:
        container = service._container
        while not state["stop"]:
            state["n"] += 1
            uow = UnitOfWork(
                id=0, method="PUT", key=f"/items/{os.getpid()}-{state['n']}", route="/items/<id>", body=body,
                contentType="application/json", receivedAt=time.time(), attempt=0,
            )
            admission = await container.submit(uow)
            report = await admission.done
            if state["counting"]:
                counts["settled" if report.status == 200 else "failed"] += 1

    async def main() -> None:
        await service.started
        for _ in range(concurrency):
            Deferred.fromCoroutine(writer())
        await _sleep(reactor, 1.0)
        state["counting"] = True
        started, cpu = time.monotonic(), cpuSeconds(os.getpid())
        await _sleep(reactor, seconds)
        state["counting"] = False
        elapsed, used = time.monotonic() - started, cpuSeconds(os.getpid()) - cpu
        state["stop"] = True
        Path(out).write_text(json.dumps({**counts, "seconds": elapsed, "cpu": used}))
        os._exit(0)  # the measurement is written: no need to wait for the UOWs under way

    root.startService()
    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(main()))
    reactor.run()


def _sleep(reactor: Any, seconds: float) -> Any:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


def inProcess(work: Path, concurrency: int, seconds: float) -> dict[str, float]:
    data = Path(tempfile.mkdtemp(prefix="pipeline-", dir=work))
    (data / "config.yaml").write_text(config(freePort(), freePort(), data / "var", 2, False))
    out = data / "result.json"
    subprocess.run(
        [sys.executable, "-m", "bench.pipeline", "--drive", str(data / "config.yaml"), str(concurrency), str(seconds),
         str(out)],
        cwd=HERE.parent, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
    )
    result = json.loads(out.read_text())
    return {"rps": result["settled"] / result["seconds"], "cpu_ms": 1000 * result["cpu"] / max(1, result["settled"]),
            "failed": result["failed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--drive", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        path, concurrency, seconds, out = args.drive
        _drive(path, int(concurrency), float(seconds), out)
        return
    if shutil.which("wrk") is None:
        raise SystemExit("bench: wrk is not installed (apt-get install wrk)")
    ratios = []
    with tempfile.TemporaryDirectory(prefix="apicontainer-pipeline-") as name:
        work = Path(name)
        for round in range(args.rounds):
            http = server(work, args.concurrency, 1024, 2, False, args.seconds)
            bare = inProcess(work, args.concurrency, args.seconds)
            ratios.append(bare["rps"] / http["rps"])
            print(f"round {round + 1}: over HTTP {http['rps']:.0f} writes/s, CPU {http['cpu_ms']:.2f} ms each;"
                  f" without HTTP {bare['rps']:.0f} writes/s ({ratios[-1]:.2f}x), CPU {bare['cpu_ms']:.2f} ms each,"
                  f" failed {bare['failed']}", flush=True)
    print(f"without HTTP: {statistics.median(ratios):.2f}x the writes a second over HTTP (median of {args.rounds})")


if __name__ == "__main__":
    main()
