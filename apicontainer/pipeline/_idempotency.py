"""
C{Idempotency-Key}: a repeated request gets the first one's result, not a
second UOW.

A key is claimed when its request arrives and held, with the digest of the
request, while the UOW has a spool file (in flight, or waiting in the fail
queue). Once the UOW is final, the state store answers for it, for the
configured retention.
"""

from __future__ import annotations

import re

from attrs import frozen

from ..interfaces import IFailQueue
from ..storage import StateRecord, StateStore
from ..uow import Report, Status, UnitOfWork

MAX_KEY_LENGTH = 255
_KEY = re.compile(r"^[\x21-\x7e]{1,%d}$" % MAX_KEY_LENGTH)


class BadIdempotencyKey(ValueError):
    """
    The header is not a usable key.
    """


def validateKey(raw: bytes) -> str:
    """
    Check an C{Idempotency-Key} header value: 1 to 255 visible ASCII
    characters, optionally as a quoted string.

    @raise BadIdempotencyKey: It is not.
    """
    text = raw.decode("latin-1").strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    if not _KEY.match(text):
        raise BadIdempotencyKey(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} visible ASCII characters"
        )
    return text


@frozen
class Replay:
    """
    The request repeats one that already has a result: answer with it.

    @ivar location: The admin API path of the UOW, when it waits in the fail
        queue.
    """

    report: Report
    location: str | None


class KeyConflict(Exception):
    """
    The key was used for a different request (422), its first request is
    still in flight (409), or was dropped by an operator (410).
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class IdempotencyIndex:
    """
    Which keys are taken, by which request, and with what result.
    """

    def __init__(self, states: StateStore, failQueue: IFailQueue) -> None:
        self._states = states
        self._failQueue = failQueue
        self._held: dict[str, tuple[str, int | None]] = {}

    def hold(self, uow: UnitOfWork) -> None:
        """
        Record that C{uow}, which has a spool file, holds its key (at
        recovery, and on admission).
        """
        if uow.idempotencyKey is not None:
            self._held[uow.idempotencyKey] = (uow.payloadHash(), uow.id)

    def release(self, uow: UnitOfWork) -> None:
        """
        C{uow} is final and its state recorded: the state store answers for
        its key from now on.
        """
        if uow.idempotencyKey is not None:
            held = self._held.get(uow.idempotencyKey)
            if held is not None and held[1] in (None, uow.id):
                del self._held[uow.idempotencyKey]

    def abandon(self, key: str) -> None:
        """
        A claimed key's request was refused before it got a UOW.
        """
        held = self._held.get(key)
        if held is not None and held[1] is None:
            del self._held[key]

    async def claim(self, key: str, payloadHash: str) -> Replay | None:
        """
        Claim C{key} for a new request, or find the result it already has.

        @return: L{None} when the key is now claimed (call L{hold} once the
            UOW is spooled, or L{abandon}), or the L{Replay} to answer with.
        @raise KeyConflict: 422 for another request under this key, 409
            while its first request is in flight.
        """
        held = self._held.get(key)
        if held is not None:
            heldHash, uowId = held
            if heldHash != payloadHash:
                raise KeyConflict(422, "this Idempotency-Key was used for a different request")
            entry = self._failQueue.get(uowId) if uowId is not None else None
            if entry is not None:
                return Replay(entry.report, f"/_uow/{entry.uow}")
            raise KeyConflict(409, "the first request with this Idempotency-Key is still in flight")
        self._held[key] = (payloadHash, None)
        try:
            record = await self._states.byIdempotencyKey(key)
        except BaseException:
            self.abandon(key)
            raise
        if record is None:
            return None
        self.abandon(key)
        return _replayOf(record, payloadHash)


def _replayOf(record: StateRecord, payloadHash: str) -> Replay:
    if record.payloadHash != payloadHash:
        raise KeyConflict(422, "this Idempotency-Key was used for a different request")
    if record.state is Status.dropped or record.report is None:
        raise KeyConflict(410, "the request with this Idempotency-Key was dropped by an operator")
    return Replay(Report.fromJSON(record.report), None)
