"""The gateway's HTTP client for engine streams: HTTP/1.1 keep-alive connections
on asyncio protocols, responses parsed by httptools (llhttp, in C).

Every token of every answer is read from an engine through here, so its cost
per chunk and per request is the gateway's, and its time to the first byte is
on every request's time to first token. General clients pay for what they
offer on every request: aiohttp (cookie jar, tracing, per-read timer
rescheduling, a StreamReader per response) took ~0.55 ms from a POST to an
engine's response headers on the benchmark machine, twice the whole direct
round trip, and httpx (pure-Python h11, a pool scanned per request) cost more
again. An engine call needs none of that: one POST, a streamed answer, an idle
timeout, a pool per engine. The rest of the gateway (admin, control,
qualification) and the tests use httpx.

Timeouts are idle timeouts only: a reasoning answer may stream for many
minutes, and what must not last long is a silence. One timer per busy
connection checks for silence, instead of one rescheduled on every read.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from typing import AsyncIterator, Callable
from urllib.parse import urlsplit

import httptools
import msgspec

_encode = msgspec.json.Encoder().encode

# Engines behind uvicorn (vLLM, the simulated engine) close a keep-alive connection
# after 5 s idle by default; dropping ours sooner means never sending a request
# down a connection the engine is closing at that moment.
KEEPALIVE_S = 4.0
# Body bytes held for a reader that is behind before the engine's socket stops
# being read (TCP then slows the engine's writes), and where reading resumes.
PAUSE_AT_BYTES = 1 << 18
RESUME_AT_BYTES = 1 << 16


class EngineError(Exception):
    """The engine could not be reached, or its connection broke."""


class EngineTimeout(EngineError):
    """Connecting took too long, or the engine stayed silent past the idle timeout."""


class EngineStream:
    """One engine response: its status, then its body as it arrives."""

    def __init__(self, connection: "_Connection"):
        self._connection: _Connection | None = connection  # None once the body has ended
        self.status = 0
        self._headers_in: asyncio.Future = asyncio.get_running_loop().create_future()
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._ended = False
        self._error: EngineError | None = None
        self._wakeup: asyncio.Future | None = None  # the reader waiting for more

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, one network read at a time (what arrived together comes
        together); ends when the body does."""
        while True:
            if self._body:
                data = self._body[0] if len(self._body) == 1 else b"".join(self._body)
                self._body.clear()
                self._body_bytes = 0
                if self._connection is not None:
                    self._connection.reader_caught_up()
                yield data
            elif self._error is not None:
                raise self._error
            elif self._ended:
                return
            else:
                self._wakeup = asyncio.get_running_loop().create_future()
                await self._wakeup

    async def read(self, limit: int = 2000) -> bytes:
        """The start of a (short) body, e.g. an error's."""
        data = b""
        try:
            async for chunk in self.chunks():
                data += chunk
                if len(data) >= limit:
                    break
        except EngineError:
            pass
        return data[:limit]

    def close(self) -> None:
        """Done with it. The connection of a body that has ended is already back
        in the pool; one still being sent is closed, which makes vLLM abort the
        request and free its slot. A reader waiting on the body gets an EngineError."""
        connection = self._connection
        if connection is not None:
            self._connection = None
            connection.abandon()
        if not self._ended and self._error is None:
            self._fail(EngineError("engine stream closed"))

    # -- fed by the connection --------------------------------------------

    def _add(self, data: bytes) -> int:
        self._body.append(data)
        self._body_bytes += len(data)
        self._wake()
        return self._body_bytes

    def _end(self) -> None:
        self._ended = True
        self._connection = None
        self._wake()

    def _fail(self, error: EngineError) -> None:
        if self._ended or self._error is not None:
            return
        self._error = error
        self._connection = None
        if not self._headers_in.done():
            self._headers_in.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an engine, carrying one request at a time."""

    def __init__(self, pool: list["_Connection"], idle_timeout_s: float):
        self.pool = pool  # where it waits between requests
        self.idle_timeout_s = idle_timeout_s
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.stream: EngineStream | None = None
        self.last_read_at = 0.0
        self.idle_since = 0.0  # when it went back to the pool
        self.reading_paused = False
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_read_at = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._break(EngineError(f"engine sent invalid HTTP ({exc})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        if self in self.pool:
            self.pool.remove(self)
        if self.stream is not None:
            self.stream._fail(EngineError(f"engine connection failed ({type(exc).__name__ if exc else 'closed'})"))
            self.stream = None

    # -- httptools callbacks ------------------------------------------------

    def on_headers_complete(self) -> None:
        stream = self.stream
        if stream is not None:
            stream.status = self.parser.get_status_code()
            stream._headers_in.set_result(None)

    def on_body(self, body: bytes) -> None:
        stream = self.stream
        if stream is not None and stream._add(body) >= PAUSE_AT_BYTES and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        stream, self.stream = self.stream, None
        self._cancel_timer()
        if self.reading_paused:  # what is buffered is the stream's now
            self.reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        if self.parser.should_keep_alive() and not self.closed:
            self.idle_since = time.monotonic()
            self.pool.append(self)
        else:
            self.close()
        if stream is not None:
            stream._end()

    # -- used by the client and the stream ------------------------------------

    def send(self, request: bytes, stream: EngineStream) -> None:
        self.stream = stream
        self.last_read_at = time.monotonic()
        self._timer = asyncio.get_running_loop().call_later(self.idle_timeout_s, self._check_silence)
        self.transport.write(request)  # type: ignore[union-attr]

    def reader_caught_up(self) -> None:
        if self.reading_paused and self.stream is not None and self.stream._body_bytes <= RESUME_AT_BYTES:
            self.reading_paused = False
            self.last_read_at = time.monotonic()  # the engine's silence counts from when we listen again
            self.transport.resume_reading()  # type: ignore[union-attr]

    def abandon(self) -> None:
        """The stream's reader gave up before the body ended."""
        self.stream = None
        self.close()

    def close(self) -> None:
        self.closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    def _check_silence(self) -> None:
        """The idle timeout: fires once per idle_timeout_s while a request runs,
        not rescheduled on every read."""
        silent_s = time.monotonic() - self.last_read_at
        if self.reading_paused:  # our reader is behind: the silence is ours, not the engine's
            wait_s = self.idle_timeout_s
        elif silent_s < self.idle_timeout_s:
            wait_s = self.idle_timeout_s - silent_s
        else:
            self._timer = None
            self._break(EngineTimeout(f"engine went silent for {silent_s:.0f} s"))
            return
        self._timer = asyncio.get_running_loop().call_later(wait_s, self._check_silence)

    def _break(self, error: EngineError) -> None:
        if self.stream is not None:
            self.stream._fail(error)
            self.stream = None
        self.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


@functools.lru_cache(maxsize=4096)
def _target(url: str) -> tuple[tuple[str, int, bool], bytes]:
    """((host, port, tls), the request line's start and Host header) of an engine URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EngineError(f"unreachable (not an http(s) URL: {url!r})")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return (parts.hostname, port, tls), f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n".encode("latin-1")


class EngineClient:
    """Pools of keep-alive connections, one per engine."""

    def __init__(self, *, connect_timeout_s: float, idle_timeout_s: float):
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._pools: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None

    async def stream(self, url: str, body: dict, headers: dict[str, str], *, sent: Callable[[], None] | None = None) -> EngineStream:
        """POST `body` as JSON and return once the response's headers are in;
        `sent` is called as soon as the request is written."""
        origin, start = _target(url)
        payload = _encode(body)
        head = [start, b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(payload)]
        for name, value in headers.items():
            line = f"{name}: {value}\r\n"
            if line.count("\n") > 1 or line.count("\r") > 1:
                raise ValueError(f"header {name!r} contains a line break")
            head.append(line.encode("latin-1"))
        head += (b"\r\n", payload)
        connection = self._pooled(origin) or await self._connect(origin)
        stream = EngineStream(connection)
        connection.send(b"".join(head), stream)
        if sent is not None:
            sent()
        try:
            await stream._headers_in
        except asyncio.CancelledError:
            stream.close()  # the client left while the engine was being asked: hang up
            raise
        return stream

    def _pooled(self, origin: tuple[str, int, bool]) -> _Connection | None:
        pool = self._pools.get(origin)
        now = time.monotonic()
        while pool:
            connection = pool.pop()
            if not connection.closed and now - connection.idle_since < KEEPALIVE_S:
                return connection
            connection.close()
        return None

    async def _connect(self, origin: tuple[str, int, bool]) -> _Connection:
        host, port, tls = origin
        pool = self._pools.setdefault(origin, [])
        ssl_context: ssl.SSLContext | None = None
        if tls:
            ssl_context = self._tls = self._tls or ssl.create_default_context()
        try:
            _, connection = await asyncio.wait_for(
                asyncio.get_running_loop().create_connection(
                    lambda: _Connection(pool, self.idle_timeout_s), host, port, ssl=ssl_context),
                self.connect_timeout_s)
        except asyncio.TimeoutError as exc:
            raise EngineTimeout(f"timed out connecting to {host}:{port}") from exc
        except OSError as exc:
            raise EngineError(f"unreachable ({type(exc).__name__})") from exc
        return connection

    async def close(self) -> None:
        for pool in self._pools.values():
            for connection in list(pool):
                connection.close()
        self._pools.clear()
