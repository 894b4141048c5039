"""
The operator's command: C{apicontainer}, over the admin API.

    apicontainer failed list [--state parked]
    apicontainer failed show ID
    apicontainer failed retry ID
    apicontainer failed drop ID
    apicontainer uow ID
    apicontainer check-config FILE

The admin API is found at C{--admin} (default: C{$APICONTAINER_ADMIN}, else
C{http://127.0.0.1:8081}); C{--token} (or C{$APICONTAINER_TOKEN}) is sent as
a bearer token. C{--json} prints what the server answered, as JSON.

Exit status: 0 done, 1 the server refused (the message says why), 2 usage,
3 the admin API could not be reached, 78 a wrong configuration.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence, TextIO

EX_REFUSED, EX_UNREACHABLE, EX_CONFIG = 1, 3, 78


class AdminError(Exception):
    """
    The admin API answered with an error, or could not be reached.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def call(admin: str, method: str, path: str, token: str | None) -> Any:
    """
    One admin API call; the decoded JSON answer.

    @raise AdminError: An error status, or no connection.
    """
    request = urllib.request.Request(admin.rstrip("/") + path, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("message", e.reason)
        except ValueError:
            message = e.reason
        raise AdminError(f"{e.code}: {message}", EX_REFUSED) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise AdminError(f"cannot reach the admin API at {admin}: {reason}", EX_UNREACHABLE) from None


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")


def table(rows: Sequence[Sequence[Any]], headings: Sequence[str], out: TextIO) -> None:
    """
    Print C{rows} as aligned columns under C{headings}.
    """
    cells = [list(headings)] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headings))]
    for row in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() + "\n")


def _report(report: dict[str, Any] | None, out: TextIO) -> None:
    if not report:
        return
    out.write("\n")
    table(
        [
            (name, v["verdict"], v["status"], v.get("detail"))
            for name, v in report.get("stashes", {}).items()
        ],
        ["STASH", "VERDICT", "STATUS", "DETAIL"],
        out,
    )


def _entry(entry: dict[str, Any], out: TextIO) -> None:
    for label, value in (
        ("UOW", entry["uow"]),
        ("key", entry.get("key")),
        ("route", entry.get("route")),
        ("state", entry.get("state")),
        ("attempts", entry.get("attempts")),
        ("first failed", _when(entry.get("first_failed_at")) if "first_failed_at" in entry else None),
        ("next attempt", _when(entry.get("next_attempt_at")) if "next_attempt_at" in entry else None),
        ("finished", _when(entry.get("finished_at")) if "finished_at" in entry else None),
        ("rollback failed", ", ".join(entry.get("rollback_failed", [])) or None),
    ):
        if value is not None:
            out.write(f"{label + ':':<17}{value}\n")
    _report(entry.get("report"), out)


def checkConfig(path: Path, out: TextIO) -> int:
    """
    Load and check a configuration as the server would, changing nothing:
    its keys and values, its stash options, and whether its data directory
    and the stashes' local paths can be created and written.
    """
    from ..blocking import inline
    from ..config import ConfigError, loadConfig
    from ..pipeline import buildStashes
    from ..stashes import StashContext
    from ._preflight import pathProblems

    try:
        config = loadConfig(path)
        stashes = buildStashes(config, StashContext(None, config.dataDir, inline, lambda name: inline))  # type: ignore[arg-type]
    except ConfigError as e:
        sys.stderr.write(f"apicontainer: {e}\n")
        return EX_CONFIG
    problems = pathProblems(config, stashes)
    if problems:
        for problem in problems:
            sys.stderr.write(f"apicontainer: {problem}\n")
        return EX_CONFIG
    out.write(
        f"{path}: OK: {len(config.stashes)} stash(es) ({', '.join(config.stashes)}),"
        f" {len(config.routes)} route(s), data in {config.dataDir}\n"
    )
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="apicontainer", description="Operate an api-container server.")
    top.add_argument("--admin", default=os.environ.get("APICONTAINER_ADMIN", "http://127.0.0.1:8081"), help="admin API URL")
    top.add_argument("--token", default=os.environ.get("APICONTAINER_TOKEN"), help="bearer token for the admin API")
    top.add_argument("--json", action="store_true", help="print the server's answer as JSON")
    commands = top.add_subparsers(dest="command", required=True)
    failed = commands.add_parser("failed", help="the fail queue").add_subparsers(dest="action", required=True)
    listing = failed.add_parser("list", help="list failed UOWs, oldest first")
    listing.add_argument("--state", choices=["queued", "retrying", "parked", "stuck"])
    for action, text in (("show", "show one failed UOW"), ("retry", "retry a failed UOW now"), ("drop", "drop a failed UOW and its spool file")):
        failed.add_parser(action, help=text).add_argument("uow", type=int)
    commands.add_parser("uow", help="the state of one UOW").add_argument("uow", type=int)
    commands.add_parser("check-config", help="check a configuration file").add_argument("file", type=Path)
    return top


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    """
    Run the command; return its exit status.
    """
    args = parser().parse_args(argv)
    if args.command == "check-config":
        return checkConfig(args.file, out)
    try:
        if args.command == "uow":
            answer = call(args.admin, "GET", f"/_uow/{args.uow}", args.token)
        elif args.action == "list":
            query = f"?state={args.state}" if args.state else ""
            answer = call(args.admin, "GET", f"/_failed{query}", args.token)
        elif args.action == "show":
            answer = call(args.admin, "GET", f"/_uow/{args.uow}", args.token)
            if not answer.get("failed"):
                raise AdminError(f"404: UOW {args.uow} is not in the fail queue (it is {answer['state']})", EX_REFUSED)
        elif args.action == "retry":
            answer = call(args.admin, "POST", f"/_failed/{args.uow}/retry", args.token)
        else:
            answer = call(args.admin, "DELETE", f"/_failed/{args.uow}", args.token)
    except AdminError as e:
        sys.stderr.write(f"apicontainer: {e}\n")
        return e.status
    if args.json:
        out.write(json.dumps(answer, indent=2) + "\n")
    elif args.command == "failed" and args.action == "list":
        table(
            [
                (e["uow"], e["state"], e["attempts"], e["report"]["status"], _when(e["next_attempt_at"]), e["key"])
                for e in answer["failed"]
            ],
            ["UOW", "STATE", "ATTEMPTS", "STATUS", "NEXT ATTEMPT", "KEY"],
            out,
        )
    elif args.command == "failed" and args.action == "retry":
        out.write(f"UOW {answer['uow']}: {answer['state']}\n")
        _report(answer.get("report"), out)
    else:
        _entry(answer, out)
    return 0


def run() -> None:
    """
    The console entry point.
    """
    raise SystemExit(main())
