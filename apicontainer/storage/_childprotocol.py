"""
What the server and its child processes say to each other.

They talk over the child's standard input and output, a frame per call and
per answer, in the order of the calls::

    length      4 bytes   big-endian uint32: what follows
    head size   4 bytes   big-endian uint32
    head        n bytes   the call (or the answer): a dict in L{marshal}'s
                          format, which both ends read alike, being the
                          same Python, at a fraction of JSON's cost
    body        the rest  bytes that go with it (a request's body), if any

A child answers first when it is ready (or why it is not), then each call.
Every answer's head has C{ok}; a refusal has C{error} and C{type}, the name
of the exception's class. Each child declares its calls once, as
L{Command}s that both ends import.
"""

from __future__ import annotations

import builtins
import marshal
import struct
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from attrs import frozen
from twisted.python.failure import Failure

from ..uow import SpooledBody, UnitOfWork

_SIZES = struct.Struct(">II")



Answer = tuple[dict[str, Any], bytes]



@frozen
class Command:
    """
    A call the server makes on one of its child processes. Each child's
    commands are declared once, in its module, and both ends use them: the
    server to make the call, the child to run it.

    @ivar name: What the call's head carries as C{op}.
    @ivar batched: Whether the child runs it in one batch with the calls
        that reached it together (a write), or on its own (a read).
    """

    name: str
    batched: bool = True



def frame(head: dict[str, Any], body: bytes = b"", dumps: Callable[[Any], bytes] = marshal.dumps) -> bytes:
    """
    One call or answer, framed.

    @param dumps: How the head is written (another than the default only
        to measure it: C{bench.frames}).
    """
    encoded = dumps(head)
    return _SIZES.pack(4 + len(encoded) + len(body), len(encoded)) + encoded + body



def frames(buffer: bytearray, loads: Callable[[bytearray], Any] = marshal.loads) -> Iterator[Answer]:
    """
    Take every whole frame off the front of C{buffer}, as (head, body).

    @param loads: How a head is read: L{frame}'s C{dumps} undone.
    """
    while len(buffer) >= 8:
        length, headSize = _SIZES.unpack_from(buffer)
        if len(buffer) < 4 + length:
            return
        head = loads(buffer[8 : 8 + headSize])
        body = bytes(buffer[8 + headSize : 4 + length])
        del buffer[: 4 + length]
        yield head, body



def refusal(reason: Failure) -> bytes:
    """
    The answer that a call failed with C{reason}.
    """
    error = reason.value
    return frame({"ok": False, "error": str(error) or type(error).__name__, "type": type(error).__name__})



def refused(head: dict[str, Any], kinds: Mapping[str, type[Exception]] = {}) -> Exception | None:
    """
    The error of an answer that is a refusal: of its kind in C{kinds}, or
    the child's L{OSError} as its built-in kind (C{NotADirectoryError},
    ...), or else a L{RuntimeError}; L{None} for an answer that is not.
    """
    if head["ok"]:
        return None
    kind = kinds.get(head["type"])
    if kind is None:
        builtin = getattr(builtins, head["type"], None)
        kind = builtin if isinstance(builtin, type) and issubclass(builtin, OSError) else RuntimeError
    return kind(head["error"])



def manyAnswer(outcomes: list[tuple[bool, Any]], encode: Callable[[Any], Any]) -> bytes:
    """
    The answer of a call that carries many operations (a batch call): for
    each, C{[True, encode(value)]} or C{[False, error, type]}.
    """
    results: list[list[Any]] = []
    for ok, value in outcomes:
        if ok:
            results.append([True, encode(value)])
        else:
            error = value.value
            results.append([False, str(error) or type(error).__name__, type(error).__name__])
    return frame({"ok": True, "results": results})


def manyResults(head: dict[str, Any], count: int) -> list[tuple[bool, Any]]:
    """
    The outcomes of a L{manyAnswer}: C{(True, value)} or C{(False, Failure)}
    with the child's error, one for each of the C{count} operations.

    @raise Exception: The call was refused as a whole (L{refused}), or the
        answer does not have C{count} outcomes.
    """
    error = refused(head)
    if error is not None:
        raise error
    outcomes: list[tuple[bool, Any]] = []
    for ok, *rest in head["results"]:
        if ok:
            outcomes.append((True, rest[0]))
        else:
            outcomes.append((False, Failure(refused({"ok": False, "error": rest[0], "type": rest[1]}))))
    if len(outcomes) != count:
        raise ValueError(f"{len(outcomes)} outcomes for {count} operations")
    return outcomes


def encodeUOW(uow: UnitOfWork, withBody: bool = True) -> tuple[dict[str, Any], bytes]:
    """
    C{uow} as a frame's head and body. A body too large to hold that lies
    in a file (its spool file) is not copied: the frame says where it lies.

    @param withBody: Whether the call needs the body at all: without it,
        the UOW decodes with an empty body (a commit or a rollback, which
        go by the UOW's id, key and attempt).
    """
    head: dict[str, Any] = {
        "id": uow.id,
        "method": uow.method,
        "key": uow.key,
        "route": uow.route,
        "type": uow.contentType,
        "at": uow.receivedAt,
        "attempt": uow.attempt,
    }
    if uow.idempotencyKey is not None:
        head["idempotency_key"] = uow.idempotencyKey
    body = uow._body
    if not withBody:
        return head, b""
    if isinstance(body, SpooledBody) and isinstance(body.source, Path):
        head["spooled"] = [str(body.source), body.offset, body.length]
        return head, b""
    return head, uow.body



def decodeUOW(head: dict[str, Any], body: bytes) -> UnitOfWork:
    """
    The UOW of a frame made by L{encodeUOW}.
    """
    spooled = head.get("spooled")
    return UnitOfWork(
        id=head["id"],
        method=head["method"],
        key=head["key"],
        route=head["route"],
        body=SpooledBody(Path(spooled[0]), spooled[1], spooled[2]) if spooled else body,
        contentType=head["type"],
        receivedAt=head["at"],
        attempt=head["attempt"],
        idempotencyKey=head.get("idempotency_key"),
    )
