"""
Hostile and broken clients against the real server: slow clients, too many
or too large headers, too many connections, a full disk, TLS and tokens.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from twisted.internet.testing import StringTransport

from apicontainer.web._limits import LimitedChannel

from tests.conftest import DEFAULT, RunningServer

pytestmark = pytest.mark.integration

TIGHT = DEFAULT.replace(
    "limits: {{max_body_bytes: 65536}}",
    "limits: {{max_body_bytes: 65536, header_timeout_s: 1, body_timeout_s: 1, max_headers: 20,"
    " max_header_bytes: 2048, max_connections_per_peer: 6, min_free_bytes: 0}}",
)


@pytest.fixture
def tight(tmp_path: Path) -> RunningServer:
    server = RunningServer(tmp_path, TIGHT)
    server.start()
    yield server
    server.kill()


def readAll(s: socket.socket) -> bytes:
    received = b""
    try:
        while chunk := s.recv(65536):
            received += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    return received


def test_slowHeadersCutOff(tight: RunningServer) -> None:
    """
    A client that sends its headers a byte at a time is answered 408 and
    disconnected at header_timeout_s, while a normal client is served.
    """
    slow = socket.create_connection(("127.0.0.1", tight.port), timeout=10)
    sent = 0
    start = time.monotonic()
    try:
        for byte in b"PUT /items/1 HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
            slow.sendall(bytes([byte]))
            sent += 1
            time.sleep(0.05)
            if time.monotonic() - start > 1.0 and sent % 10 == 0:
                assert tight.request("PUT", "/items/2", b"fast")[0] == 200
    except (BrokenPipeError, ConnectionResetError):
        pass
    answer = readAll(slow)
    slow.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
    assert b"headers took longer than 1s" in answer
    assert sent < 200


def test_slowBodyCutOff(tight: RunningServer) -> None:
    """
    A body that trickles in is cut off with 408 at body_timeout_s; nothing is
    spooled.
    """
    s = socket.create_connection(("127.0.0.1", tight.port), timeout=10)
    s.sendall(b"PUT /items/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
    try:
        for _ in range(60):
            s.sendall(b"x")
            time.sleep(0.05)
    except (BrokenPipeError, ConnectionResetError):
        pass
    answer = readAll(s)
    s.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert os.listdir(tight.dataDir / "spool") == []


def test_headerLimits(tight: RunningServer) -> None:
    """
    Too many headers, or too many header bytes, are a 400 and the
    connection is closed.
    """
    many = "".join(f"X-H{i}: v\r\n" for i in range(30))
    big = "X-Big: " + "b" * 4000 + "\r\n"
    for extra in (many, big):
        s = socket.create_connection(("127.0.0.1", tight.port), timeout=10)
        s.sendall(f"GET /items/1 HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        answer = readAll(s)
        s.close()
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]


def test_connectionsPerPeerCapped(tight: RunningServer) -> None:
    """
    Past max_connections_per_peer open connections from one address, the
    next one is answered 503 with Retry-After and closed; closing one frees
    a place.
    """
    held = [socket.create_connection(("127.0.0.1", tight.port), timeout=10) for _ in range(6)]
    try:
        # The server takes the six in its own time: until it has, a request
        # on a seventh is served.
        deadline = time.monotonic() + 10
        while tight.request("GET", "/items/0")[0] != 503:
            assert time.monotonic() < deadline, "the seventh connection was never refused"
        extra = socket.create_connection(("127.0.0.1", tight.port), timeout=10)
        answer = readAll(extra)
        extra.close()
        assert answer.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in answer
        held.pop().close()
        deadline = time.monotonic() + 10
        while (status := tight.request("PUT", "/items/1", b"x")[0]) == 503:
            assert time.monotonic() < deadline, "closing a connection did not free a place"
        assert status == 200
    finally:
        for s in held:
            s.close()


def test_tokensAndTLS(tmp_path: Path) -> None:
    """
    Over TLS (an ssl: endpoint with a certificate made here), ingress and
    the admin API each accept only their own bearer tokens.
    """
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
        check=True, capture_output=True,
    )
    for name, token in (("tokens", b"client-secret"), ("admin-tokens", b"admin-secret")):
        (tmp_path / name).write_text(f"# {name}\nsha256:{hashlib.sha256(token).hexdigest()}\n")
    config = DEFAULT.replace(
        'listen: "tcp:{port}:interface=127.0.0.1"',
        f'listen: "ssl:{{port}}:interface=127.0.0.1:privateKey={tmp_path}/key.pem:certKey={tmp_path}/cert.pem"',
    ) + f"auth: {{{{tokens_file: {tmp_path}/tokens, admin_tokens_file: {tmp_path}/admin-tokens}}}}\n"
    server = RunningServer(tmp_path, config)
    server.adminHeaders = {"Authorization": "Bearer admin-secret"}
    try:
        server.start()
        context = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))

        def ingress(token: str) -> tuple[int, dict]:  # type: ignore[type-arg]
            connection = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=10)
            connection.request("PUT", "/items/1", body=b"x", headers={"Authorization": f"Bearer {token}"})
            response = connection.getresponse()
            return response.status, dict(response.getheaders())

        assert ingress("client-secret")[0] == 200
        status, headers = ingress("admin-secret")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert server.admin("GET", "/_health")[0] == 200
        server.adminHeaders = {"Authorization": "Bearer client-secret"}
        assert server.admin("GET", "/_health")[0] == 401
        with pytest.raises(ssl.SSLError):
            connection = http.client.HTTPSConnection("127.0.0.1", server.port, context=ssl.create_default_context(), timeout=10)
            connection.request("GET", "/items/1")
    finally:
        server.kill()


def test_fullDiskAnswers503AndRecovers(tmp_path: Path) -> None:
    """
    On a full disk (a 16 MiB tmpfs as data_dir), writes are refused with 503
    and Retry-After before anything is spooled; once space returns, writes
    succeed again without a restart.
    """
    mount = tmp_path / "small"
    mount.mkdir()
    # Big enough for a write's reserve: its SQLite stash counts a checkpoint.
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        config = DEFAULT.replace("data_dir: {data}", f"data_dir: {mount}/var").replace(
            "limits: {{max_body_bytes: 65536}}", "limits: {{max_body_bytes: 65536, min_free_bytes: 262144}}"
        )
        server = RunningServer(tmp_path, config)
        server.dataDir = mount / "var"
        server.start()
        try:
            assert server.request("PUT", "/items/1", b"x")[0] == 200
            filler = mount / "filler"
            with filler.open("wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
            status, headers, body = server.request("PUT", "/items/2", b"y" * 1000)
            assert (status, json.loads(body)["error"], headers["retry-after"]) == (503, "disk_full", "5")
            assert os.listdir(server.dataDir / "spool") == []
            filler.unlink()
            status, _, body = server.request("PUT", "/items/2", b"y" * 1000)
            assert status == 200, body
        finally:
            server.kill()
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def test_localAddressOncePerConnection() -> None:
    """
    A connection's local address is asked of its socket once, not once per
    request: each ask is a system call on the reactor thread.
    """
    transport = StringTransport()
    asked = []
    local = transport.getHost

    def getHost() -> object:
        asked.append(1)
        return local()

    transport.getHost = getHost  # type: ignore[method-assign]
    channel = LimitedChannel()
    channel.makeConnection(transport)
    first, second = channel.getHost(), channel.getHost()
    assert first is second
    assert first == local()
    assert len(asked) == 1
