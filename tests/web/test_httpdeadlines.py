"""
The header and body deadlines of each request on a connection, on a fake
clock: a 408 at the deadline, none for a client that keeps up, and no timer
set or cancelled per request on a keep-alive connection.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from apicontainer.config import Limits
from apicontainer.web._limits import LimitedChannel, LimitedSite

REQUEST = b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"


class _Answer(Resource):
    isLeaf = True

    def render_PUT(self, request: object) -> bytes:
        return b"ok"


def connect(clock: Clock) -> tuple[LimitedChannel, StringTransport]:
    site = LimitedSite(_Answer(), Limits(headerTimeout=10, bodyTimeout=60), reactor=clock)
    site._logDateTime = "-"  # what startFactory would set: the access log's date
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def deadlineTimers(clock: Clock, channel: LimitedChannel) -> list[object]:
    """
    The timers of C{channel}'s deadlines (not Twisted's idle timeout).
    """
    return [call for call in clock.getDelayedCalls() if call.func == channel._check]


def test_headers_too_slow() -> None:
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(b"PUT /x HTTP/1.1\r\n")
    clock.advance(9.9)
    assert transport.value() == b""
    clock.advance(0.1)
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert b"the request headers took longer than 10s" in transport.value()
    assert transport.disconnecting


def test_body_too_slow() -> None:
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhe")
    clock.advance(10)  # past the headers' deadline: the body has its own
    assert transport.value() == b""
    clock.advance(49.9)
    assert transport.value() == b""
    clock.advance(0.1)
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert b"the request body took longer than 60s" in transport.value()


def test_keep_alive_requests_set_no_timer_each() -> None:
    """
    Requests that keep up are served however long the connection lives, and
    a request of a keep-alive connection neither sets nor cancels a timer.
    """
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(REQUEST)
    [timer] = deadlineTimers(clock, channel)
    for _ in range(50):
        clock.advance(0.1)
        channel.dataReceived(REQUEST)
        assert deadlineTimers(clock, channel) == [timer]
    assert transport.value().count(b"HTTP/1.1 200 ") == 51
    clock.advance(30)  # idle between requests: no deadline (the idle timeout is Twisted's, 60 s)
    assert b" 408 " not in transport.value()
    assert not transport.disconnecting


def test_headers_after_a_slow_body() -> None:
    """
    A timer set again for a body's later deadline is brought forward for
    the headers of the next request.
    """
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhe")
    clock.advance(30)
    channel.dataReceived(b"llo")
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    transport.clear()
    channel.dataReceived(b"PUT /x HTTP/1.1\r\n")
    clock.advance(10)
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert b"headers" in transport.value()


def test_closing_cancels_the_timer() -> None:
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(b"PUT /x HTTP/1.1\r\n")
    channel.connectionLost(None)
    assert deadlineTimers(clock, channel) == []
