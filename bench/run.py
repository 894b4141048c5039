"""
Measure the server against the same-run baseline.

    .venv/bin/python -m bench.run              # the whole matrix (about 12 minutes)
    .venv/bin/python -m bench.run --quick      # a smoke run (seconds)
    .venv/bin/python -m bench.run --headline 4 # the c=32 case, the Klein app and the peers, 4 times (7 minutes)

For each case it starts the real server (`twist apicontainer`) on a config
of that case in a temporary data directory, drives it with wrk from another
process over loopback (each request a key of its own), and prints req/s,
p50, p99 and the peak RSS of the server and its child processes, each also as a ratio to the baseline (a
Klein app that reads the body and stores nothing) measured in the same run
with the same concurrency and body size. Beside each baseline it measures
two floors: bench/floor.py (the same app writing each body durably to a file
of its own) and bench/designfloor.py (the same app doing the least work the
design's order of durable steps needs: spool, then SQLite and a file). At
c=32 with 1 KiB bodies (and in the smoke run) it also measures the peer,
bench/peer.py: what a user would write by hand with FastAPI and uvicorn,
with one worker process and with two (pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
TWIST = str(Path(sys.executable).parent / "twist")
# Measured beside each baseline: bench/floor.py (one durable file per
# request) and bench/designfloor.py (the least work the design's order of
# durable steps needs).
FLOORS = ("floor", "designfloor")
# The peer (bench/peer.py), by its number of uvicorn workers.
PEERS = {"FastAPI, 1 worker": "1", "FastAPI, 2 workers": "2"}


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(port: int, admin: int, data: Path, stashes: int, failing: bool) -> str:
    lines = [
        f'listen: "tcp:{port}:interface=127.0.0.1"',
        f'admin_listen: "tcp:{admin}:interface=127.0.0.1"',
        f"data_dir: {data}",
        "limits: {max_body_bytes: 4194304, max_in_flight: 4096, min_free_bytes: 0, max_connections_per_peer: 1024}",
        "failqueue: {retry: {initial_s: 3600}}",
        "stashes:",
    ]
    names = []
    for i in range(stashes):
        name = f"s{i}"
        if i % 2 == 0:
            lines.append(f"  {name}: {{type: sqlite, path: {name}.sqlite3}}")
        else:
            lines.append(f"  {name}: {{type: filesystem, root: {name}}}")
        names.append(name)
    if failing:
        lines.append("  picky: {type: filesystem, root: picky, part: attachment}")
        names.append("picky")
    lines += ["routes:", "  - path: /items/<id>", f"    stashes: [{', '.join(names)}]"]
    return "\n".join(lines) + "\n"


def waitFor(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def family(pid: int) -> list[int]:
    """
    Process C{pid} and its descendants (the server and the child process
    of each filesystem stash).
    """
    pids = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                pids += family(int(child))
    except FileNotFoundError:
        pass  # it has just ended
    return pids


def _status(pid: int, field: str) -> int:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in lines:
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def peakRSS(pid: int) -> int:
    """
    The sum of the peak RSS of the server and its child processes.
    """
    return sum(_status(p, "VmHWM:") for p in family(pid))


def wrkEnvironment(body: int, failEvery: int) -> dict[str, str]:
    """
    The environment of a wrk run of C{unique.lua}: each run has keys of its
    own (C{RUN}), so that it never writes an earlier run's keys again.
    """
    return dict(os.environ, BODY_BYTES=str(body), FAIL_EVERY=str(failEvery), RUN=os.urandom(4).hex())


def wrk(port: int, concurrency: int, seconds: float, body: int, failEvery: int) -> dict[str, float]:
    env = wrkEnvironment(body, failEvery)
    threads = max(1, min(2, concurrency))
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{max(1, round(seconds))}s", "--latency", "--timeout", "30s",
         "-s", str(HERE / "unique.lua"), f"http://127.0.0.1:{port}/"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    total = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]

    def percentile(p: str) -> float:
        match = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        assert match, out
        value, unit = float(match[1]), match[2]
        return value / 1000 if unit == "us" else value if unit == "ms" else value * 1000

    return {"rps": rate, "p50": percentile("50"), "p99": percentile("99"), "requests": total,
            "non2xx": int(non2xx[1]) if non2xx else 0}


def cpuSeconds(pid: int) -> float:
    """
    The CPU time (user and system, all threads) process C{pid} and its
    child processes have used.
    """
    total = 0
    for p in family(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def measure(command: list[str], port: int, concurrency: int, seconds: float, body: int, failEvery: int, cwd: Path,
            env: dict[str, str] | None = None) -> dict[str, Any]:
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        waitFor(port)
        wrk(port, concurrency, 1.0, body, failEvery)  # warm up
        before = cpuSeconds(process.pid)
        result = wrk(port, concurrency, seconds, body, failEvery)
        # The server's CPU time per request: steadier than req/s on a shared
        # machine, and it shows what a request costs when the CPU is the limit.
        result["cpu_ms"] = 1000 * (cpuSeconds(process.pid) - before) / max(1, result["requests"])
        result["rss"] = peakRSS(process.pid)
        return result
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def server(work: Path, concurrency: int, body: int, stashes: int, failing: bool, seconds: float,
           env: dict[str, str] | None = None) -> dict[str, Any]:
    """
    Measure the server (C{twist apicontainer}, with C{env}) on the config
    of a case, in a data directory of its own under C{work}.

    The data directory stays until C{work} is removed, after the last run:
    on an ext4 file system without a journal (this machine's), creating a
    file skips every inode freed in the last few minutes, one by one, so
    the removal of a run's files would slow the file creations of the runs
    after it (docs/benchmarks.md, "The machine").
    """
    data = Path(tempfile.mkdtemp(prefix="bench-", dir=work))
    port, admin = freePort(), freePort()
    (data / "config.yaml").write_text(config(port, admin, data / "var", stashes, failing))
    return measure([TWIST, "apicontainer", "--config", str(data / "config.yaml")], port, concurrency, seconds,
                   body, 10 if failing else 0, data, env)


def beside(work: Path, module: str, extra: list[str], concurrency: int, seconds: float, body: int) -> dict[str, Any]:
    """
    Measure a program the server is compared with (a floor, the peer): the
    module run as C{python -m module PORT DIRECTORY *extra}, with a
    directory of its own under C{work}.
    """
    data = Path(tempfile.mkdtemp(prefix=f"{module.rsplit('.', 1)[-1]}-", dir=work))
    port = freePort()
    return measure([sys.executable, "-m", module, str(port), str(data), *extra], port, concurrency, seconds, body, 0, HERE.parent)


def case(work: Path, concurrency: int, body: int, stashes: int, failing: bool, seconds: float,
         baselines: dict[tuple[int, int], dict[str, Any]], withPeers: bool = False) -> dict[str, Any]:
    key = (concurrency, body)
    if key not in baselines:
        port = freePort()
        baselines[key] = measure([sys.executable, "-m", "bench.baseline", str(port)], port, concurrency, seconds, body, 0, HERE.parent)
        line = (f"c={concurrency} body={body}: baseline {baselines[key]['rps']:.0f} req/s, p99 {baselines[key]['p99']:.2f} ms,"
                f" CPU {baselines[key]['cpu_ms']:.2f} ms/req")
        for floor in FLOORS:
            result = beside(work, f"bench.{floor}", [], concurrency, seconds, body)
            baselines[key][floor] = result
            line += (f"; {floor} {result['rps']:.0f} req/s ({result['rps'] / baselines[key]['rps']:.2f}x),"
                     f" p99 {result['p99']:.2f} ms ({result['p99'] / baselines[key]['p99']:.1f}x), CPU {result['cpu_ms']:.2f} ms/req")
        if withPeers:
            baselines[key]["peers"] = {}
            for name, workers in PEERS.items():
                result = beside(work, "bench.peer", [workers], concurrency, seconds, body)
                baselines[key]["peers"][name] = result
                line += (f"; {name} {result['rps']:.0f} req/s ({result['rps'] / baselines[key]['rps']:.2f}x),"
                         f" p99 {result['p99']:.2f} ms, CPU {result['cpu_ms']:.2f} ms/req")
        print(line, flush=True)
    result = server(work, concurrency, body, stashes, failing, seconds)
    base = baselines[key]
    peers = base.get("peers", {})
    better = max(peers.values(), key=lambda peer: peer["rps"]) if peers else {}
    return {
        "concurrency": concurrency, "body": body, "stashes": stashes, "failing": "10%" if failing else "0%",
        **result,
        "rps_ratio": result["rps"] / base["rps"], "p99_ratio": result["p99"] / base["p99"],
        "baseline_rps": base["rps"], "baseline_p99": base["p99"],
        "peer_rps": better.get("rps"), "peer_cpu_ms": better.get("cpu_ms"),
    }


def rss(pid: int) -> int:
    return sum(_status(p, "VmRSS:") for p in family(pid))


def soak(minutes: float) -> None:
    """
    Run c=32, 1 KiB, 2 stashes for C{minutes}, and print the server's RSS
    every 30 s and its growth from minute 1 to the end.
    """
    with tempfile.TemporaryDirectory(prefix="apicontainer-soak-") as work:
        data = Path(work)
        port, admin = freePort(), freePort()
        (data / "config.yaml").write_text(config(port, admin, data / "var", 2, False))
        process = subprocess.Popen([TWIST, "apicontainer", "--config", str(data / "config.yaml")], cwd=data,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            waitFor(port)
            load = subprocess.Popen(["wrk", "-t", "2", "-c", "32", "-d", f"{int(minutes * 60)}s", "-s",
                                     str(HERE / "unique.lua"), f"http://127.0.0.1:{port}/"],
                                    env=wrkEnvironment(1024, 0), stdout=subprocess.PIPE, text=True)
            samples = []
            started = time.monotonic()
            while load.poll() is None:
                time.sleep(30)
                samples.append((time.monotonic() - started, rss(process.pid)))
                print(f"{samples[-1][0] / 60:.1f} min: RSS {samples[-1][1] / 2**20:.1f} MiB", flush=True)
            out = load.communicate()[0]
            rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
            atOne = next(value for at, value in samples if at >= 60)
            last = samples[-1][1]
            print(f"soak: {minutes:g} min at c=32, {rate[1] if rate else '?'} req/s;"
                  f" RSS at minute 1 {atOne / 2**20:.1f} MiB, at the end {last / 2**20:.1f} MiB,"
                  f" growth {100 * (last - atOne) / atOne:+.1f}%")
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()


HEADLINE = (32, 1024, 2, False)


def cases(quick: bool, headline: int | None = None) -> list[tuple[int, int, int, bool]]:
    if quick:
        return [(16, 1024, 2, False)]
    if headline:
        return [HEADLINE] * headline
    chosen = [HEADLINE]
    chosen += [(c, 1024, 2, False) for c in (1, 16, 64)]
    chosen += [(16, b, 2, False) for b in (65536, 1048576)]
    chosen += [(c, 1048576, 2, False) for c in (1, 64)]
    chosen += [(16, 1024, s, False) for s in (1, 4, 8)]
    chosen += [(16, 1024, 2, True)]
    return chosen


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| c | body | stashes | failing | req/s | x baseline | p50 ms | p99 ms | p99 x baseline | CPU ms/req | peak RSS MiB |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        rows.append(
            f"| {r['concurrency']} | {r['body'] // 1024} KiB | {r['stashes']} | {r['failing']} | {r['rps']:.0f} |"
            f" {r['rps_ratio']:.2f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['p99_ratio']:.1f} | {r['cpu_ms']:.2f} |"
            f" {r['rss'] / 2**20:.0f} |"
        )
    return "\n".join(rows)


def baselineTable(baselines: dict[tuple[int, int], dict[str, Any]]) -> str:
    rows = ["| c | body | baseline req/s | baseline p99 ms | baseline CPU ms/req | " + " | ".join(
                f"{floor} req/s | {floor} x baseline | {floor} p99 ms | {floor} p99 x baseline | {floor} CPU ms/req"
                for floor in FLOORS) + " |",
            "| ---: | ---: | ---: | ---: | ---: |" + " ---: | ---: | ---: | ---: | ---: |" * len(FLOORS)]
    for (c, body), base in baselines.items():
        row = f"| {c} | {body // 1024} KiB | {base['rps']:.0f} | {base['p99']:.2f} | {base['cpu_ms']:.2f} |"
        for floor in FLOORS:
            result = base[floor]
            row += (f" {result['rps']:.0f} | {result['rps'] / base['rps']:.2f} | {result['p99']:.2f} |"
                    f" {result['p99'] / base['p99']:.1f} | {result['cpu_ms']:.2f} |")
        rows.append(row)
    return "\n".join(rows)


def peersTable(results: list[dict[str, Any]], baselines: dict[tuple[int, int], dict[str, Any]]) -> str:
    """
    api-container beside the Klein app and the peers, at each concurrency
    and body size the peers were measured at: every figure of the same run.
    """
    rows = ["| c | body | system | req/s | x Klein app | p99 ms | p99 x Klein app | CPU ms/req |",
            "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for (c, body), base in baselines.items():
        if "peers" not in base:
            continue
        ours = next(r for r in results if (r["concurrency"], r["body"], r["stashes"], r["failing"]) == (c, body, 2, "0%"))
        systems = [("Klein app that stores nothing", base), ("api-container", ours), *base["peers"].items()]
        for name, r in systems:
            rows.append(f"| {c} | {body // 1024} KiB | {name} | {r['rps']:.0f} | {r['rps'] / base['rps']:.2f} |"
                        f" {r['p99']:.2f} | {r['p99'] / base['p99']:.1f} | {r['cpu_ms']:.2f} |")
    return "\n".join(rows)


def headlineSummary(results: list[dict[str, Any]]) -> str:
    """
    The headline case's runs against the targets, each against the
    Klein app and the peers measured just before it: req/s at least the
    better peer configuration's, p99 at most 3x the Klein app's.
    """
    lines = ["| run | Klein app req/s | Klein app p99 ms | req/s | better peer req/s | x better peer | p99 ms |"
             " p99 x Klein app | CPU ms/req | peer CPU ms/req |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for number, r in enumerate(results, 1):
        lines.append(f"| {number} | {r['baseline_rps']:.0f} | {r['baseline_p99']:.2f} | {r['rps']:.0f} | {r['peer_rps']:.0f} |"
                     f" {r['rps'] / r['peer_rps']:.2f} | {r['p99']:.2f} | {r['p99_ratio']:.2f} | {r['cpu_ms']:.2f} |"
                     f" {r['peer_cpu_ms']:.2f} |")
    throughput = sum(r["rps"] >= r["peer_rps"] for r in results)
    latency = sum(r["p99_ratio"] <= 3 for r in results)
    ratio = statistics.median(r["rps"] / r["peer_rps"] for r in results)
    lines.append("")
    lines.append(f"req/s >= the better peer's in {throughput} of {len(results)} runs (median"
                 f" {ratio:.2f}x); p99 <= 3x the Klein app's in {latency} of {len(results)} runs")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short case: checks that the harness works")
    parser.add_argument("--seconds", type=float, default=None, help="per case (default 8, quick 2)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--soak", type=float, metavar="MINUTES", help="instead: a sustained run, RSS over time")
    parser.add_argument("--headline", type=int, metavar="N",
                        help="instead: the c=32, 1 KiB, 2-stash case N times, each against the Klein app and the peers"
                             " measured just before it")
    parser.add_argument("--no-peers", action="store_true", help="leave out the FastAPI peer")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench: wrk is not installed (apt-get install wrk)")
    if args.soak:
        soak(args.soak)
        return
    peers = not args.no_peers
    if args.headline and not peers:
        raise SystemExit("bench: --headline measures each run against the peer; leave out --no-peers")
    if peers and not all(importlib.util.find_spec(name) for name in ("fastapi", "uvicorn")):
        raise SystemExit("bench: the peer needs FastAPI and uvicorn (pip install -e '.[bench]'), or --no-peers")
    seconds = args.seconds or (2.0 if args.quick else 8.0)
    baselines: dict[tuple[int, int], dict[str, Any]] = {}
    results = []
    with tempfile.TemporaryDirectory(prefix="apicontainer-bench-") as work:
        for c, body, stashes, failing in cases(args.quick, args.headline):
            if args.headline:
                baselines.clear()  # each run against a baseline measured just before it
            first = (c, body, stashes, failing) == cases(args.quick)[0]
            result = case(Path(work), c, body, stashes, failing, seconds, baselines, withPeers=peers and first)
            results.append(result)
            print(f"c={c} body={body} stashes={stashes} failing={result['failing']}: {result['rps']:.0f} req/s"
                  f" ({result['rps_ratio']:.2f}x baseline), p50 {result['p50']:.2f} ms, p99 {result['p99']:.2f} ms"
                  f" ({result['p99_ratio']:.1f}x), CPU {result['cpu_ms']:.2f} ms/req, peak RSS {result['rss'] / 2**20:.0f} MiB, non-2xx {result['non2xx']}", flush=True)
    print()
    print(table(results))
    print()
    if args.headline:
        print(headlineSummary(results))
    else:
        print(baselineTable(baselines))
        if peers:
            print()
            print(peersTable(results, baselines))
    if args.json:
        args.json.write_text(json.dumps({"cases": results, "baselines": [
            {"concurrency": c, "body": b, **base} for (c, b), base in baselines.items()]}, indent=1))


if __name__ == "__main__":
    main()
