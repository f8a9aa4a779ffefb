"""gateway/engine_client.py against a real HTTP server on loopback: only silences
time out (never a long stream), closing early closes the connection (what makes
an engine abort the work), a body read to its end leaves the connection for
the next request, and a reader that falls behind slows the engine down instead
of filling the gateway's memory."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.engine_client import EngineClient, EngineError, EngineTimeout


class Engine:
    """An HTTP/1.1 server that streams `chunks` chunks `gap_s` apart, then stays
    silent for `silent_s` (if set) before ending; it counts connections and
    notices clients that hang up."""

    def __init__(self, chunks: int, gap_s: float, silent_s: float = 0.0, chunk_bytes: int = 0, close_after: bool = False):
        self.chunks, self.gap_s, self.silent_s = chunks, gap_s, silent_s
        self.chunk_bytes = chunk_bytes  # pad each event to about this size
        self.close_after = close_after  # hang up after each answer (as an engine restarting would)
        self.written = 0  # body bytes the client's socket has taken
        self.connections = 0
        self.bodies: list[dict] = []
        self.hung_up = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1/completions"

    async def __aexit__(self, *exc) -> None:
        assert self.server is not None
        self.server.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
                self.bodies.append(json.loads(await reader.readexactly(length)))
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                for i in range(self.chunks):
                    data = b"data: {\"i\": %d, \"pad\": \"%s\"}\n\n" % (i, b"x" * self.chunk_bytes)
                    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                    await writer.drain()
                    self.written += len(data)
                    if self.gap_s:
                        await asyncio.sleep(self.gap_s)
                await asyncio.sleep(self.silent_s)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
                if self.close_after:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            self.hung_up.set()


async def read_all(client: EngineClient, url: str) -> bytes:
    stream = await client.stream(url, {"prompt": "hi"}, {"X-Request-Id": "r1"})
    try:
        assert stream.status == 200
        return b"".join([data async for data in stream.chunks()])
    finally:
        stream.close()


async def test_a_stream_longer_than_the_idle_timeout_is_not_cut_while_chunks_flow():
    client = EngineClient(connect_timeout_s=2, idle_timeout_s=0.3)
    async with Engine(chunks=12, gap_s=0.05) as url:  # 0.6 s in all, never 0.3 s silent
        body = await read_all(client, url)
    await client.close()
    assert body.count(b"data: ") == 12


async def test_an_engine_silent_past_the_idle_timeout_fails_as_a_timeout():
    client = EngineClient(connect_timeout_s=2, idle_timeout_s=0.2)
    async with Engine(chunks=1, gap_s=0, silent_s=2.0) as url:
        with pytest.raises(EngineTimeout):
            await read_all(client, url)
    await client.close()


async def test_an_engine_nobody_listens_for_is_unreachable_not_a_timeout():
    client = EngineClient(connect_timeout_s=2, idle_timeout_s=1)
    async with Engine(chunks=1, gap_s=0) as url:
        pass  # the server is gone: its port refuses connections
    with pytest.raises(EngineError) as failure:
        await client.stream(url, {}, {})
    assert not isinstance(failure.value, EngineTimeout)
    await client.close()


async def test_closing_mid_stream_hangs_up_on_the_engine_and_fails_the_reader():
    client = EngineClient(connect_timeout_s=2, idle_timeout_s=5)
    engine = Engine(chunks=1000, gap_s=0.01)
    async with engine as url:
        stream = await client.stream(url, {"prompt": "hi"}, {})
        chunks = stream.chunks()
        await chunks.__anext__()

        async def read_rest() -> None:
            async for _ in chunks:
                pass

        reader = asyncio.ensure_future(read_rest())
        await asyncio.sleep(0.05)
        stream.close()  # e.g. the watchdog giving up on a worker, or the client leaving
        with pytest.raises(EngineError):
            await asyncio.wait_for(reader, 2)
        await asyncio.wait_for(engine.hung_up.wait(), 2)  # vLLM aborts the request on this
    await client.close()


async def test_a_body_read_to_its_end_leaves_the_connection_for_the_next_request():
    client = EngineClient(connect_timeout_s=2, idle_timeout_s=5)
    engine = Engine(chunks=3, gap_s=0)
    async with engine as url:
        for _ in range(3):
            await read_all(client, url)
    await client.close()
    assert engine.connections == 1
    assert engine.bodies == [{"prompt": "hi"}] * 3


async def test_a_connection_the_engine_closed_is_not_used_again():
    client = EngineClient(connect_timeout_s=2, idle_timeout_s=5)
    engine = Engine(chunks=2, gap_s=0, close_after=True)
    async with engine as url:
        for _ in range(3):
            body = await read_all(client, url)
            assert body.count(b"data: ") == 2
            await asyncio.sleep(0.05)  # the hang-up reaches the client
    await client.close()
    assert engine.connections == 3


async def test_an_engine_error_is_read_with_its_status_and_the_connection_kept():
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            error = b'{"error": {"message": "prompt is too long", "code": 400}}'
            writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(error), error))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/completions"
    client = EngineClient(connect_timeout_s=2, idle_timeout_s=5)
    for _ in range(2):
        stream = await client.stream(url, {"prompt": "hi"}, {})
        assert stream.status == 400
        assert json.loads(await stream.read())["error"]["message"] == "prompt is too long"
        stream.close()
    await client.close()
    server.close()
    assert connections == 1


async def test_a_reader_that_falls_behind_slows_the_engine_instead_of_filling_memory():
    client = EngineClient(connect_timeout_s=2, idle_timeout_s=5)
    total = 64 << 20
    engine = Engine(chunks=total // (64 << 10), gap_s=0, chunk_bytes=64 << 10)
    async with engine as url:
        stream = await client.stream(url, {"prompt": "hi"}, {})
        chunks = stream.chunks()
        await chunks.__anext__()
        await asyncio.sleep(0.5)  # the reader stalls: the engine must stop well short of the end
        stalled_at = engine.written
        assert stalled_at < total // 4
        received = 0
        async for data in chunks:  # reading again lets the engine finish
            received += len(data)
        stream.close()
    await client.close()
    assert engine.written >= total


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent():
    client = EngineClient(connect_timeout_s=2, idle_timeout_s=5)
    engine = Engine(chunks=1, gap_s=0)
    async with engine as url:
        with pytest.raises(ValueError):
            await client.stream(url, {}, {"X-Request-Id": "abc\r\nX-Injected: 1"})
    await client.close()
    assert engine.bodies == []


async def test_a_reader_that_stalls_longer_than_the_idle_timeout_is_not_a_silent_engine():
    # The engine is never silent here: the gateway stopped reading it, for longer than
    # the idle timeout, because its own reader fell behind.
    client = EngineClient(connect_timeout_s=2, idle_timeout_s=0.2)
    total = 16 << 20
    engine = Engine(chunks=total // (64 << 10), gap_s=0, chunk_bytes=64 << 10)
    async with engine as url:
        stream = await client.stream(url, {"prompt": "hi"}, {})
        chunks = stream.chunks()
        received = len(await chunks.__anext__())
        await asyncio.sleep(0.8)
        async for data in chunks:
            received += len(data)
        stream.close()
    await client.close()
    assert received >= total
