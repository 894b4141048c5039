"""
The peer: the service a user would write by hand in an afternoon, to show
what api-container costs against it.

    python -m bench.peer PORT DIRECTORY [WORKERS]

A FastAPI app on uvicorn (WORKERS processes, 1 by default) whose PUT writes
the body to SQLite (WAL, C{synchronous=FULL}) and to a file of its own with
an fsync, in a worker thread, then answers 200. Nothing else: no spool, no
undo record, no rollback, no retry, no per-key order, no idempotency; a
crash between the two writes leaves them apart.

FastAPI and uvicorn are not dependencies of api-container: C{pip install -e
'.[bench]'} brings them.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

DIRECTORY = Path(os.environ.get("PEER_DIRECTORY", "."))
app = FastAPI()
_local = threading.local()


def _db() -> sqlite3.Connection:
    db = getattr(_local, "db", None)
    if db is None:
        db = sqlite3.connect(DIRECTORY / "peer.sqlite3", timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE IF NOT EXISTS documents (key TEXT PRIMARY KEY, body BLOB)")
        _local.db = db
    return db


def store(key: str, body: bytes) -> None:
    """
    Write C{body} under C{key} to SQLite and to a file, each durably.
    """
    _db().execute("INSERT OR REPLACE INTO documents (key, body) VALUES (?, ?)", (key, body))
    fd = os.open(DIRECTORY / "files" / quote(key, safe=""), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)


@app.put("/items/{item}")
async def put(item: str, request: Request) -> Response:
    await run_in_threadpool(store, f"/items/{item}", await request.body())
    return Response(b'{"outcome":"stored"}\n', media_type="application/json")


def main() -> None:
    import uvicorn

    port, directory = int(sys.argv[1]), Path(sys.argv[2])
    workers = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    (directory / "files").mkdir(parents=True, exist_ok=True)
    os.environ["PEER_DIRECTORY"] = str(directory)
    uvicorn.run(
        "bench.peer:app", host="127.0.0.1", port=port, workers=workers, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
