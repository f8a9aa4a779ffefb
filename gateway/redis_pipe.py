"""One Redis connection shared by every request of a gateway, for the calls on a request's path.

Reserving room on a worker and releasing it are one Lua script each, and every
request makes both. Through redis-py's asyncio client such a call costs about
200 µs of CPU (a pooled connection taken and given back, the command built and
its reply parsed in Python); over a single pipelined connection it costs a tenth
of that: the commands of one turn of the event loop go out in one write at its
end (a request's release rides with other requests' calls: fewer system calls
for the gateway and fewer reads for Redis, +9% one-token requests/s measured
side by side), replies come back in the same order (Redis answers one
connection's commands in order), and hiredis parses them in C. A call that must
not wait for the end of the turn (`script_now`) writes at once, behind what was
queued before it. Everything else keeps using redis-py.

Errors are redis-py's own exception types, so callers handle an outage the
same way whichever client met it. A broken connection fails the calls waiting
on it; the next call connects again.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, Callable

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError

# As the gateway's redis-py client does: a call that meets a dead connection (Redis
# restarted) is tried again on a fresh one, briefly, so a blip is invisible and a
# real outage still answers fast. Only idempotent scripts go through here.
_TRIES = 3
_BACKOFF_S = (0.02, 0.1)


def _error(reply: ResponseError) -> ResponseError:
    """An error reply as redis-py raises it (NoScriptError for an unknown script)."""
    return NoScriptError(str(reply)) if str(reply).startswith("NOSCRIPT") else reply


class _Protocol(asyncio.Protocol):
    """The connection: commands out, replies matched to their callers in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(replyError=ResponseError)
        # (reply, sent at, what turns the reply into the future's result)
        self.waiting: collections.deque[tuple[asyncio.Future, float, Callable[[Any], Any] | None]] = collections.deque()
        self.lost: Exception | None = None
        self.unsent: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while self.waiting:
            reply = self.reader.gets()
            if reply is False:
                return
            future, _, decode = self.waiting.popleft()
            if future.done():
                continue
            if decode is None:
                future.set_result(reply)  # `call` looks at error replies itself
            elif isinstance(reply, ResponseError):
                future.set_exception(_error(reply))
            else:
                try:
                    future.set_result(decode(reply))
                except Exception as exc:  # noqa: BLE001 - the caller's to judge, not the connection's
                    future.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError(f"connection to Redis lost ({exc or 'closed'})"))

    def fail(self, error: Exception) -> None:
        self.lost = self.lost or error
        while self.waiting:
            future, _, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.close()

    def send(self, args: tuple, decode: Callable[[Any], Any] | None = None, *, now: bool = False) -> asyncio.Future:
        """The reply's future; the command is written at the end of this turn of the
        event loop with the others made in it, or (`now`) at once, after them."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self.unsent and not now:
            loop.call_soon(self._flush)
        self.unsent.append(hiredis.pack_command(args))
        self.waiting.append((future, time.monotonic(), decode))
        if now:
            self._flush()
        return future

    def _flush(self) -> None:
        data = b"".join(self.unsent)
        self.unsent.clear()
        if data and self.lost is None and self.transport is not None:
            self.transport.write(data)


class RedisPipe:
    """Calls on one pipelined connection, with the address, credentials and
    timeouts of a redis-py client's (plain TCP) connection pool."""

    def __init__(self, host: str, port: int, *, db: int = 0, username: str | None = None, password: str | None = None,
                 socket_timeout: float | None = None, connect_timeout: float | None = None):
        self.host, self.port, self.db = host, port, db
        self.username, self.password = username, password
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout
        self._protocol: _Protocol | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the one the connection belongs to
        self._connecting: asyncio.Future | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    @classmethod
    def like(cls, redis: Redis) -> RedisPipe | None:
        """One for the server `redis` talks to; None if it is reached otherwise than
        over plain TCP (TLS, a Unix socket), which only redis-py speaks here."""
        pool = redis.connection_pool
        if pool.connection_class is not Connection:
            return None
        kw = pool.connection_kwargs
        return cls(kw.get("host", "localhost"), int(kw.get("port", 6379)), db=int(kw.get("db") or 0),
                   username=kw.get("username"), password=kw.get("password"),
                   socket_timeout=kw.get("socket_timeout"), connect_timeout=kw.get("socket_connect_timeout"))

    async def script(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """Run a registered Lua script (loading it first if Redis does not know it)."""
        try:
            return await self.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.call("EVAL", script.script, len(keys), *keys, *args)

    def script_now(self, script: AsyncScript, keys: list[str], args: list[Any], decode: Callable[[Any], Any]) -> asyncio.Future | None:
        """Run a registered Lua script, its command written before this returns: the
        future of `decode(reply)`, set the moment the reply is read, so that whoever
        awaits it after Redis has answered finds it ready, without another turn of
        the event loop. None when the connection is not up (`script` connects). No
        retries: an error (NoScriptError, a lost connection) is the future's, and
        the caller may try again through `script`."""
        protocol = self._connected_protocol()
        if protocol is None:
            return None
        return protocol.send(("EVALSHA", script.sha, len(keys), *keys, *args), decode, now=True)

    async def call(self, *args: Any) -> Any:
        """One command's reply; ResponseError for an error reply, ConnectionError or
        TimeoutError when Redis cannot be reached (after a few quick tries)."""
        for attempt in range(_TRIES):
            try:
                protocol = self._connected_protocol() or await self._connect()
                reply = await protocol.send(args)
            except (ConnectionError, TimeoutError):
                if attempt == _TRIES - 1:
                    raise
                await asyncio.sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])
                continue
            if isinstance(reply, ResponseError):
                raise _error(reply)
            return reply
        raise AssertionError("unreachable")

    def _connected_protocol(self) -> _Protocol | None:
        """The connection, if it is up and belongs to the running event loop."""
        protocol = self._protocol
        if protocol is None or protocol.lost is not None or self._loop is not asyncio.get_running_loop():
            return None
        return protocol

    async def _connect(self) -> _Protocol:
        # Callers at the same moment share one connection attempt.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, connecting: asyncio.Future) -> None:
        self._connecting = None
        if not connecting.cancelled() and connecting.exception() is None:
            self._protocol = connecting.result()
            self._loop = connecting.get_loop()

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await asyncio.wait_for(loop.create_connection(_Protocol, self.host, self.port), self.connect_timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"connecting to Redis at {self.host}:{self.port} timed out") from None
        except OSError as exc:
            raise ConnectionError(f"cannot connect to Redis at {self.host}:{self.port}: {exc}") from None
        hello = []
        if self.password:
            hello.append(protocol.send(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)))
        if self.db:
            hello.append(protocol.send(("SELECT", self.db)))
        for reply in hello:
            answer = await reply
            if isinstance(answer, ResponseError):
                protocol.fail(ConnectionError(f"Redis refused the connection: {answer}"))
                raise ConnectionError(f"Redis refused the connection: {answer}")
        self._watch_replies()
        return protocol

    def _watch_replies(self) -> None:
        """A reply later than the socket timeout means Redis hangs: drop the
        connection, failing the calls that wait on it, as redis-py would."""
        if self.socket_timeout is None or self._watchdog is not None:
            return
        period = max(self.socket_timeout / 4, 0.05)

        def check() -> None:
            self._watchdog = None
            protocol = self._protocol
            if protocol is None or protocol.lost is not None:
                return
            if protocol.waiting and time.monotonic() - protocol.waiting[0][1] > self.socket_timeout:
                protocol.fail(TimeoutError(f"Redis did not answer within {self.socket_timeout:g} s"))
                return
            self._watchdog = asyncio.get_running_loop().call_later(period, check)

        self._watchdog = asyncio.get_running_loop().call_later(period, check)

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
