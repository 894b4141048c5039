"""
Two servers, each on its own data directory (the file spool), pointed at the
same PostgreSQL table and Redis prefix: the second is refused by both
stores, in one line each, and changes nothing there.
"""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import pytest

from tests.conftest import RunningServer
from tests.services import POSTGRES_DSN, REDIS, dropStores, require

pytestmark = pytest.mark.integration

CONFIG = """\
listen: "tcp:{port}:interface=127.0.0.1"
admin_listen: "tcp:{admin}:interface=127.0.0.1"
data_dir: {data}
failqueue: {{retry: {{initial_s: 600}}}}
stashes:
  catalog: {{type: postgres, dsn: "%(dsn)s", table: %(table)s}}
  cache: {{type: redis, url: "redis://%(redis)s/0", prefix: "%(prefix)s"}}
routes:
  - path: /items/<id>
    stashes: [catalog, cache]
    read: [catalog]
"""


def test_secondServerRefused(tmp_path: Path) -> None:
    require("PostgreSQL", "127.0.0.1", 5432)
    require("Redis", *REDIS)
    table, prefix = f"t_{uuid.uuid4().hex[:12]}", f"test-{uuid.uuid4().hex[:10]}:"
    config = CONFIG % {"dsn": POSTGRES_DSN, "table": table, "redis": f"{REDIS[0]}:{REDIS[1]}", "prefix": prefix}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = RunningServer(tmp_path / "a", config)
    second = RunningServer(tmp_path / "b", config)
    first.start()
    try:
        assert first.request("PUT", "/items/1", b"first")[0] == 200
        second.start()
        try:
            status, _, body = second.request("PUT", "/items/1", b"second")
            assert status == 503, body
            log = second.log.read_text()
            line = f"stash catalog: table {table} holds writes numbered by another api-container data directory"
            assert any(line in text and "could not start" in text for text in log.splitlines())
            assert f"stash cache: prefix {prefix} holds writes numbered by another api-container data directory" in log
        finally:
            second.kill(signal.SIGTERM)
        assert first.request("GET", "/items/1")[2] == b"first"
        assert first.request("PUT", "/items/1", b"again")[0] == 200
    finally:
        first.kill(signal.SIGTERM)
        dropStores(table, prefix)
