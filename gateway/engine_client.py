"""The gateway's HTTP client for engine streams, and the only module that knows it is aiohttp.

Every token of every answer is read from an engine through here, so its cost
per chunk and per request is the gateway's. aiohttp parses HTTP in C and keeps
idle connections per host; httpx (pure-Python h11, a pool scanned on every
request) cost about 4× the CPU per relayed chunk and 25× per short request in
`benchmarks/results/overhead`. The rest of the gateway (admin, control,
qualification) and the tests use httpx.

Timeouts are idle timeouts only: a reasoning answer may stream for many
minutes, and what must not last long is a silence.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import aiohttp
import msgspec

_encode = msgspec.json.Encoder().encode

# Engines behind uvicorn (vLLM, the simulated engine) close a keep-alive connection
# after 5 s idle by default; dropping ours sooner means never sending a request
# down a connection the engine is closing at that moment.
KEEPALIVE_S = 4.0


class EngineError(Exception):
    """The engine could not be reached, or its connection broke."""


class EngineTimeout(EngineError):
    """Connecting took too long, or the engine stayed silent past the idle timeout."""


class EngineStream:
    """One engine response: its status, then its body as it arrives."""

    def __init__(self, response: aiohttp.ClientResponse):
        self._response = response
        self.status = response.status

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, one network read at a time; ends when the body does."""
        try:
            async for data in self._response.content.iter_any():
                yield data
        except asyncio.TimeoutError as exc:  # aiohttp's socket timeouts are, too
            raise EngineTimeout(f"engine went silent ({type(exc).__name__})") from exc
        except aiohttp.ClientError as exc:
            raise EngineError(f"engine connection failed ({type(exc).__name__})") from exc

    async def read(self, limit: int = 2000) -> bytes:
        """The start of a (short) body, e.g. an error's."""
        try:
            return (await self._response.read())[:limit]
        except (asyncio.TimeoutError, aiohttp.ClientError):
            return b""

    def close(self) -> None:
        """Done with it. A body read to its end leaves the connection pooled; one
        closed earlier closes the connection, which makes vLLM abort the request
        and free its slot. A reader waiting on the body gets an EngineError."""
        self._response.close()


class EngineClient:
    """One pool of keep-alive connections to all engines."""

    def __init__(self, *, connect_timeout_s: float, idle_timeout_s: float):
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=idle_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _session_now(self) -> aiohttp.ClientSession:
        # Made on first use: an aiohttp session belongs to the event loop it is made in.
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    async def stream(self, url: str, body: dict, headers: dict[str, str]) -> EngineStream:
        """POST `body` as JSON and return once the response's headers are in."""
        try:
            response = await self._session_now().post(
                url, data=_encode(body), headers={**headers, "Content-Type": "application/json"})
        except asyncio.TimeoutError as exc:
            raise EngineTimeout(f"timed out ({type(exc).__name__})") from exc
        except aiohttp.ClientError as exc:
            raise EngineError(f"unreachable ({type(exc).__name__})") from exc
        return EngineStream(response)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
