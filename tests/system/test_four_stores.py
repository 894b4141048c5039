"""
examples/four-stores.yaml end to end: the real server writes one multipart
request to SQLite, the filesystem, PostgreSQL and Redis, or to none of them.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from tests.conftest import RunningServer
from tests.services import REDIS, ThrowawayPostgres, require

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).parents[2] / "examples" / "four-stores.yaml"
BOUNDARY = "form-boundary-7"


def form(document: dict, attachment: bytes) -> bytes:  # type: ignore[type-arg]
    return (
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"document\"\r\n"
        f"Content-Type: application/json\r\n\r\n{json.dumps(document)}\r\n"
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"attachment\"; filename=\"a.bin\"\r\n"
        f"Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + attachment + f"\r\n--{BOUNDARY}--\r\n".encode()


def config(pg: ThrowawayPostgres, prefix: str) -> str:
    text = EXAMPLE.read_text()
    text = text.replace('"tcp:8080:interface=127.0.0.1"', '"tcp:{port}:interface=127.0.0.1"')
    text = text.replace('"tcp:8081:interface=127.0.0.1"', '"tcp:{admin}:interface=127.0.0.1"')
    text = text.replace("data_dir: ./var", "data_dir: {data}")
    text = text.replace("port=5432 dbname=test", f"port={pg.port} dbname=postgres")
    text = text.replace('prefix: "apicontainer:"', f'prefix: "{prefix}"')
    text = text.replace("initial_s: 1, factor: 2, max_delay_s: 60", "initial_s: 0.2, factor: 1, max_delay_s: 0.2")
    return text.replace("{", "{{").replace("}", "}}").replace("{{port}}", "{port}").replace(
        "{{admin}}", "{admin}"
    ).replace("{{data}}", "{data}")


def holdings(server: RunningServer, pg: ThrowawayPostgres, prefix: str) -> dict[str, object]:
    """
    What each of the four stores holds for /items/1.
    """
    db = sqlite3.connect(server.dataDir / "records.sqlite3")
    row = db.execute("SELECT body FROM documents WHERE key = '/items/1' AND body IS NOT NULL").fetchone()
    db.close()
    try:
        with psycopg.connect(pg.dsn) as conn:
            pgRow = conn.execute("SELECT body FROM documents WHERE key = '/items/1' AND body IS NOT NULL").fetchone()
    except psycopg.OperationalError:
        pgRow = "unreachable"
    redis = subprocess.run(
        ["redis-cli", "-h", REDIS[0], "-p", str(REDIS[1]), "--no-raw", "HGET", f"{prefix}doc:/items/1", "body"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    try:
        attachment = (server.dataDir / "files" / "items" / "1.doc").read_bytes()
    except FileNotFoundError:
        attachment = None
    return {
        "sqlite": json.loads(row[0]) if row else None,
        "postgres": pgRow if pgRow == "unreachable" else (json.loads(bytes(pgRow[0])) if pgRow else None),
        "redis": json.loads(json.loads(redis)) if redis and redis != "(nil)" else None,
        "files": attachment,
    }


def test_fourStoresOrNone(tmp_path: Path) -> None:
    """
    A multipart write lands in all four stores; with PostgreSQL stopped, the
    next one is a 503 and the three others keep their before-image; once
    PostgreSQL is back, the fail queue drains and all four hold it.
    """
    require("Redis", *REDIS)
    pg = ThrowawayPostgres()
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    server = RunningServer(tmp_path, config(pg, prefix))
    try:
        server.start()
        headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        status, _, body = server.request("PUT", "/items/1", form({"v": 1}, b"A1"), headers)
        assert status == 200, body
        assert holdings(server, pg, prefix) == {"sqlite": {"v": 1}, "postgres": {"v": 1}, "redis": {"v": 1}, "files": b"A1"}
        status, headers2, read = server.request("GET", "/items/1")
        assert (status, json.loads(read), headers2["content-type"]) == (200, {"v": 1}, "application/json")

        pg.stop()
        status, _, body = server.request("PUT", "/items/1", form({"v": 2}, b"A2"), headers)
        report = json.loads(body)
        assert (status, report["outcome"]) == (503, "queued"), body
        assert report["stashes"]["catalog"]["status"] == 503
        before = holdings(server, pg, prefix)
        assert before == {"sqlite": {"v": 1}, "postgres": "unreachable", "redis": {"v": 1}, "files": b"A1"}

        pg.start()
        deadline = time.monotonic() + 30
        while server.admin("GET", "/_failed")[1]["failed"]:
            assert time.monotonic() < deadline, "the fail queue did not drain"
            time.sleep(0.1)
        assert holdings(server, pg, prefix) == {"sqlite": {"v": 2}, "postgres": {"v": 2}, "redis": {"v": 2}, "files": b"A2"}
        assert os.listdir(server.dataDir / "spool") == []
    finally:
        server.kill()
        pg.destroy()
        subprocess.run(["redis-cli", "-h", REDIS[0], "-p", str(REDIS[1]), "EVAL",
                        "for _,k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end", "0", prefix + "*"],
                       capture_output=True)
