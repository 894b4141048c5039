"""
Compare two revisions of the server in alternating rounds.

    .venv/bin/python -m bench.compare BEFORE AFTER [--rounds 8] [--seconds 8]
        [--concurrency 32] [--body 1024] [--stashes 2] [--failing]

BEFORE and AFTER are git revisions of this checkout (or C{.} for the working
tree as it is). Each round runs one case of C{bench.run} (by default c=32,
1 KiB, 2 stashes; C{--failing}: one request in ten refused) once on each,
the order swapped every round (AB, BA, AB, ...), each on a server started as
C{bench.run} starts it, with that revision's C{apicontainer} package first on
C{PYTHONPATH} and this checkout's environment for everything else. On a
machine whose speed drifts from minute to minute, a change of less than
about 10 % shows only in such rounds: the summary says in how many rounds
AFTER was faster and had the lower p99, and the median ratio of req/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .run import server

ROOT = Path(__file__).parent.parent


def checkout(revision: str, into: Path) -> Path:
    """
    The C{apicontainer} package and Twisted plugin of C{revision}, in a
    folder of their own under C{into} (C{.}: this checkout's own).
    """
    if revision == ".":
        return ROOT
    target = into / revision.replace("/", "_")
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", revision, "apicontainer", "twisted"],
        capture_output=True, check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def environment(tree: Path) -> dict[str, str]:
    """
    The environment of a server that runs C{tree}'s package.
    """
    return dict(os.environ, PYTHONPATH=str(tree))


def runs(tree: Path, cwd: Path) -> str:
    """
    Where a server started as L{bench.run.server} starts it, with
    L{environment}, imports C{apicontainer} from: the check that a round
    measures the revision it names.
    """
    return subprocess.run(
        [sys.executable, "-c", "import apicontainer; print(apicontainer.__file__)"],
        env=environment(tree), cwd=cwd, capture_output=True, text=True, check=True,
    ).stdout.strip()


def summary(before: str, after: str, results: dict[str, list[dict[str, Any]]]) -> str:
    rounds = len(results[before])
    lines = ["| revision | median req/s | median p99 ms | median CPU ms/req |", "| --- | ---: | ---: | ---: |"]
    for revision in (before, after):
        rows = results[revision]
        lines.append(
            f"| {revision} | {statistics.median(r['rps'] for r in rows):.0f}"
            f" | {statistics.median(r['p99'] for r in rows):.1f}"
            f" | {statistics.median(r['cpu_ms'] for r in rows):.2f} |"
        )
    pairs = list(zip(results[before], results[after]))
    ratios = sorted(a["rps"] / b["rps"] for b, a in pairs)
    faster = sum(a["rps"] > b["rps"] for b, a in pairs)
    lower = sum(a["p99"] < b["p99"] for b, a in pairs)
    cheaper = sum(a["cpu_ms"] < b["cpu_ms"] for b, a in pairs)
    lines.append("")
    lines.append(
        f"{after} against {before}: req/s higher in {faster} of {rounds} rounds, median ratio"
        f" {statistics.median(ratios):.3f} ({ratios[0]:.3f}-{ratios[-1]:.3f}); p99 lower in {lower} of {rounds};"
        f" CPU per request lower in {cheaper} of {rounds}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("before", help="a git revision, or . for the working tree")
    parser.add_argument("after", help="a git revision, or . for the working tree")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0, help="per run (default 8)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--body", type=int, default=1024, help="bytes (default 1024)")
    parser.add_argument("--stashes", type=int, default=2)
    parser.add_argument("--failing", action="store_true", help="one request in ten refused, as in bench.run")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench: wrk is not installed (apt-get install wrk)")
    if args.before == args.after:
        raise SystemExit("bench: give two different revisions")
    with tempfile.TemporaryDirectory(prefix="apicontainer-compare-") as name:
        work = Path(name)
        trees = {revision: checkout(revision, work) for revision in (args.before, args.after)}
        for revision, tree in trees.items():
            source = runs(tree, work)
            if not Path(source).is_relative_to(tree):
                raise SystemExit(f"bench: {revision} would run {source}, not its own apicontainer")
            print(f"{revision}: apicontainer from {source}", flush=True)
        results: dict[str, list[dict[str, Any]]] = {revision: [] for revision in trees}
        for round in range(args.rounds):
            order = [args.before, args.after] if round % 2 == 0 else [args.after, args.before]
            for revision in order:
                result = server(work, args.concurrency, args.body, args.stashes, args.failing, args.seconds,
                                environment(trees[revision]))
                results[revision].append(result)
                print(f"round {round + 1} {revision}: {result['rps']:.0f} req/s, p99 {result['p99']:.1f} ms,"
                      f" CPU {result['cpu_ms']:.2f} ms/req, non-2xx {result['non2xx']}", flush=True)
    print()
    print(summary(args.before, args.after, results))


if __name__ == "__main__":
    main()
