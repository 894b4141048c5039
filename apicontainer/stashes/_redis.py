"""
The C{redis} stash: documents in Redis hashes, through txredisapi.

Layout, with the default prefix C{apicontainer:}::

    apicontainer:doc:<key>       hash: uow, body, ctype (or deleted=1)
    apicontainer:undo:<uow>      hash: attempt, state, key, had, prev, body, ctype
    apicontainer:pending:<key>   set: UOWs on the key with prepared rollbacks

Each operation is one Lua script, so the write and its before-image are
applied atomically: no crash can leave one without the other. The scripts
touch keys of several names, so the stash needs a standalone Redis (not a
cluster).

Durability is the Redis server's: a write is as durable as its
C{appendonly}/C{appendfsync} settings make it (C{appendfsync always} for the
guarantee of the other stashes).
"""

from __future__ import annotations

from typing import Any, Callable
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from ..config import StashSpec
from ..interfaces import IProbe, IPrunable, IReader, IStartable, IStash
from ..uow import Document, UnitOfWork, Verdict
from ._context import StashContext, claimProblem, unavailable

STASH = r"""
local u = redis.call('HMGET', KEYS[2], 'attempt', 'state')
if u[2] then
  if u[2] == 'prepared' then return {'stored', 'already stored'} end
  if tonumber(u[1]) >= tonumber(ARGV[2]) then return {'declined', 'rolled back before it arrived'} end
end
local cur = redis.call('HMGET', KEYS[1], 'uow', 'body', 'ctype', 'deleted')
if cur[1] then
  local current = tonumber(cur[1])
  if current == tonumber(ARGV[1]) then return {'stored', 'already stored'} end
  if current > tonumber(ARGV[1]) then return {'declined', 'superseded by UOW ' .. cur[1]} end
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'attempt', ARGV[2], 'state', 'prepared', 'key', ARGV[3])
if cur[1] then
  redis.call('HSET', KEYS[2], 'had', '1', 'prev', cur[1])
  if cur[4] then redis.call('HSET', KEYS[2], 'prevdeleted', '1') end
  if cur[2] then redis.call('HSET', KEYS[2], 'body', cur[2]) end
  if cur[3] then redis.call('HSET', KEYS[2], 'ctype', cur[3]) end
else
  redis.call('HSET', KEYS[2], 'had', '0')
end
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[1])
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'uow', ARGV[1], 'deleted', '1')
else
  redis.call('HSET', KEYS[1], 'uow', ARGV[1], 'body', ARGV[5])
  if ARGV[7] == '1' then redis.call('HSET', KEYS[1], 'ctype', ARGV[6]) end
end
return {'stored', ''}
"""

ROLLBACK = r"""
local u = redis.call('HMGET', KEYS[2], 'attempt', 'state', 'had', 'prev', 'prevdeleted', 'body', 'ctype')
if not u[2] then
  redis.call('HSET', KEYS[2], 'attempt', ARGV[2], 'state', 'rolledback', 'key', ARGV[3])
  return 0
end
local attempt = math.max(tonumber(u[1]), tonumber(ARGV[2]))
if u[2] == 'prepared' then
  local cur = redis.call('HGET', KEYS[1], 'uow')
  if cur == ARGV[1] then
    redis.call('DEL', KEYS[1])
    if u[3] == '1' then
      redis.call('HSET', KEYS[1], 'uow', u[4])
      if u[5] then redis.call('HSET', KEYS[1], 'deleted', '1') end
      if u[6] then redis.call('HSET', KEYS[1], 'body', u[6]) end
      if u[7] then redis.call('HSET', KEYS[1], 'ctype', u[7]) end
    end
  else
    -- A later UOW wrote over ours: keep its write, and make its own
    -- rollback restore our before-image, not our write.
    for _, other in ipairs(redis.call('SMEMBERS', KEYS[3])) do
      local later = ARGV[4] .. 'undo:' .. other
      if other ~= ARGV[1] and redis.call('HGET', later, 'prev') == ARGV[1] then
        redis.call('HDEL', later, 'prev', 'prevdeleted', 'body', 'ctype')
        redis.call('HSET', later, 'had', u[3])
        if u[4] then redis.call('HSET', later, 'prev', u[4]) end
        if u[5] then redis.call('HSET', later, 'prevdeleted', '1') end
        if u[6] then redis.call('HSET', later, 'body', u[6]) end
        if u[7] then redis.call('HSET', later, 'ctype', u[7]) end
      end
    end
  end
  redis.call('SREM', KEYS[3], ARGV[1])
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'attempt', tostring(attempt), 'state', 'rolledback', 'key', ARGV[3])
return 1
"""

PRUNE = r"""
local n = 0
for _, key in ipairs(KEYS) do
  local u = redis.call('HMGET', key, 'state', 'attempt')
  if u[1] == 'rolledback' and tonumber(u[2]) < tonumber(ARGV[1]) then
    redis.call('DEL', key)
    n = n + 1
  end
end
return n
"""

COMMIT = r"""
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""


def parseURL(url: str) -> dict[str, Any]:
    """
    The connection arguments of a C{redis://[user:password@]host[:port][/db]}
    URL.

    @raise ValueError: It is not one.
    """
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError(f"expected redis://host[:port][/db], not {url!r}")
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ValueError(f"the database must be a number, not {database!r}")
    return {
        "host": parts.hostname,
        "port": parts.port or 6379,
        "dbid": int(database) if database else None,
        "password": unquote(parts.password) if parts.password else None,
        "username": unquote(parts.username) if parts.username else None,
    }


@implementer(IStash, IReader, IStartable, IProbe, IPrunable)
class RedisStash:
    """
    Documents in Redis, applied and undone by Lua scripts.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        url: str,
        prefix: str = "apicontainer:",
        poolSize: int = 4,
        timeout: float = 10.0,
        numbering: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.name = name
        self.url = url
        self.prefix = prefix
        self._connection = parseURL(url)
        self._poolSize = poolSize
        self._timeout = timeout
        self._redis: Any = None
        self._numbering = numbering
        self._claimed = False

    @classmethod
    def fromConfig(cls, spec: StashSpec, context: StashContext) -> RedisStash:
        """
        Build the stash from its options: C{url} (C{redis://host:port/db}) and
        C{prefix} (default C{apicontainer:}).
        """
        url = spec.options.string("url")
        try:
            parseURL(url)
        except ValueError as e:
            raise spec.options.error("url", str(e)) from None
        prefix = spec.options.string("prefix", "apicontainer:")
        return cls(
            spec.name,
            url,
            prefix,
            poolSize=min(spec.concurrency, 16),
            timeout=spec.timeout,
            numbering=context.numbering,
        )

    def start(self) -> Deferred[None]:
        self._connect()
        return succeed(None)

    def _connect(self) -> None:
        import txredisapi

        options = dict(self._connection)
        if not options["dbid"]:
            # Database 0 is the default: no SELECT, which txredisapi treats
            # as fatal (it stops reconnecting) if Redis does not answer it.
            options["dbid"] = None
        self._redis = txredisapi.lazyConnectionPool(
            poolsize=self._poolSize,
            reconnect=True,
            charset=None,
            connectTimeout=self._timeout,
            replyTimeout=self._timeout,
            convertNumbers=False,
            **options,
        )
        connected = getattr(self._redis, "_connected", None)
        if isinstance(connected, Deferred):
            connected.addErrback(self._notConnected)

    def _notConnected(self, reason: Any) -> None:
        self.log.warn(
            "stash {stash} could not connect to Redis: {error}", stash=self.name, error=str(reason.value)
        )

    def _client(self) -> Any:
        """
        The connection pool; a new one if the current one gave up.

        txredisapi stops reconnecting for good when AUTH or SELECT fails or
        times out while connecting (a paused or overloaded Redis); a stash
        must come back when Redis does.
        """
        factory = getattr(self._redis, "_factory", None)
        if factory is not None and factory.stopped:
            self.log.warn("stash {stash}: the Redis pool stopped reconnecting; opening a new one", stash=self.name)
            self._connect()
        return self._redis

    def stop(self) -> Deferred[None]:
        if self._redis is None:
            return succeed(None)
        redis, self._redis = self._redis, None
        return redis.disconnect()  # type: ignore[no-any-return]

    def _keys(self, uow: UnitOfWork) -> list[str]:
        p = self.prefix
        return [f"{p}doc:{uow.key}", f"{p}undo:{uow.id}", f"{p}pending:{uow.key}"]

    async def _claim(self) -> None:
        """
        Record this server's UOW numbering under the prefix (once), or
        refuse the prefix if another numbering is recorded there.

        @raise ForeignNumbering: Another data directory writes the prefix.
        """
        ours = self._numbering()
        if ours is None:
            self._claimed = True  # no numbering to claim for (a store tried on its own)
            return
        key = f"{self.prefix}numbering"
        await self._client().set(key, ours, only_if_not_exists=True)
        theirs = await self._client().get(key)
        theirs = theirs.decode() if isinstance(theirs, bytes) else theirs
        problem = claimProblem(self.name, f"prefix {self.prefix}", theirs, ours)
        if problem is not None:
            raise problem
        self._claimed = True

    def stash(self, uow: UnitOfWork) -> Deferred[Verdict]:
        if not self._claimed:
            return Deferred.fromCoroutine(self._claim()).addCallbacks(
                lambda _: self.stash(uow), unavailable(self, uow, Exception)
            )
        contentType = uow.contentType
        arguments = [
            str(uow.id),
            str(uow.attempt),
            uow.key,
            "1" if uow.isDelete else "0",
            uow.body,
            contentType or "",
            "1" if contentType is not None else "0",
        ]

        def verdict(reply: list[bytes]) -> Verdict:
            kind, detail = reply[0].decode(), reply[1].decode() or None
            if kind == "declined":
                return Verdict.declined(detail)
            return Verdict.stored(detail=detail)

        return self._client().eval(STASH, self._keys(uow), arguments).addCallbacks(  # type: ignore[no-any-return]
            verdict, unavailable(self, uow, Exception)
        )

    def rollback(self, uow: UnitOfWork) -> Deferred[None]:
        arguments = [str(uow.id), str(uow.attempt), uow.key, self.prefix]
        return self._client().eval(ROLLBACK, self._keys(uow), arguments).addCallback(lambda _: None)  # type: ignore[no-any-return]

    def commit(self, uow: UnitOfWork) -> Deferred[None]:
        return self._client().eval(COMMIT, self._keys(uow), [str(uow.id)]).addCallback(lambda _: None)  # type: ignore[no-any-return]

    def prune(self, horizon: int) -> Deferred[int]:
        return Deferred.fromCoroutine(self._prune(horizon))

    async def _prune(self, horizon: int) -> int:
        # SCAN a page of undo keys at a time; the script deletes only old
        # markers, so a key that became prepared meanwhile stays.
        cursor, count = 0, 0
        while True:
            cursor, keys = await self._client().scan(cursor, f"{self.prefix}undo:*", 1000)
            names = [k.decode() if isinstance(k, bytes) else k for k in keys]
            if names:
                count += int(await self._client().eval(PRUNE, names, [str(horizon)]))
            if int(cursor) == 0:
                return count

    def probe(self) -> Deferred[None]:
        return self._client().ping().addCallback(lambda _: None)  # type: ignore[no-any-return]

    def read(self, key: str) -> Deferred[Document | None]:
        def document(fields: list[bytes | None]) -> Document | None:
            uow, body, contentType, deleted = fields
            if uow is None or deleted is not None or body is None:
                return None
            return Document(body, contentType.decode() if contentType is not None else None, int(uow))

        return self._client().hmget(f"{self.prefix}doc:{key}", ["uow", "body", "ctype", "deleted"]).addCallback(document)  # type: ignore[no-any-return]
