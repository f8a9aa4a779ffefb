"""gateway/redis_pipe.py against a real redis-server: many callers share one
connection and each gets its own reply, scripts Redis forgot are loaded again,
the database and password of the URL are honoured, and a restarted Redis is
reconnected to while an absent one is a quick ConnectionError."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError, NoScriptError, ResponseError

from gateway.embedded_redis import EmbeddedRedis
from gateway.redis_pipe import RedisPipe

ECHO = "return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}"


async def test_concurrent_calls_each_get_their_own_reply(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    pipe = RedisPipe.like(client)
    assert pipe is not None
    script = client.register_script(ECHO)
    replies = await asyncio.gather(*(pipe.script(script, [f"k{i % 7}"], [f"arg{i}"]) for i in range(500)))
    assert [r[:2] for r in replies] == [[f"k{i % 7}".encode(), f"arg{i}".encode()] for i in range(500)]
    assert sorted(r[2] for r in replies if r[0] == b"k0") == list(range(1, 73))  # one INCR each, in order
    await pipe.close()
    await client.aclose()


async def test_a_script_redis_forgot_is_loaded_again(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    pipe = RedisPipe.like(client)
    script = client.register_script(ECHO)
    assert (await pipe.script(script, ["a"], [1]))[2] == 1
    await client.script_flush()  # as after a restart of Redis
    assert (await pipe.script(script, ["a"], [1]))[2] == 2
    with pytest.raises(ResponseError):
        await pipe.call("INCR", "no", "such", "arity")
    await pipe.close()
    await client.aclose()


async def test_a_script_sent_now_goes_out_behind_calls_queued_before_it(redis_url):
    """Calls made in one turn of the event loop are written together at its end;
    one sent now must not overtake them, or replies would reach the wrong callers."""
    client = aioredis.Redis.from_url(redis_url)
    pipe = RedisPipe.like(client)
    script = client.register_script(ECHO)
    await pipe.script(script, ["n"], [0])  # connected, script loaded: n = 1
    queued = [asyncio.ensure_future(pipe.call("INCR", "n")) for _ in range(3)]
    await asyncio.sleep(0)  # their commands are made, waiting for the end of the turn
    now = pipe.script_now(script, ["n"], ["now"], decode=lambda reply: reply[2])
    assert await asyncio.gather(*queued) == [2, 3, 4]
    assert await now == 5
    await pipe.close()
    await client.aclose()


async def test_a_script_sent_now_is_on_its_way_before_anything_is_awaited(redis_url):
    """script_now writes the command before it returns: a reply future that holds
    the decoded result as soon as the reply is read. Without a connection it sends
    nothing (None), and an error reply is the future's exception."""
    client = aioredis.Redis.from_url(redis_url)
    pipe = RedisPipe.like(client)
    script = client.register_script(ECHO)
    assert pipe.script_now(script, ["n"], [1], decode=lambda reply: reply) is None, "not connected yet"
    assert (await pipe.script(script, ["n"], [1]))[2] == 1  # connects and loads the script

    sent = pipe.script_now(script, ["n"], ["x"], decode=lambda reply: ("decoded", reply[2]))
    assert sent is not None and not sent.done()
    # Written already: with this event loop not yet run again, Redis has done its INCR.
    other = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 5
    while other.get("n") != b"2" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert other.get("n") == b"2" and not sent.done()
    other.close()
    assert await sent == ("decoded", 2)

    await client.script_flush()
    forgotten = pipe.script_now(script, ["n"], [1], decode=lambda reply: reply)
    with pytest.raises(NoScriptError):
        await forgotten
    assert await client.get("n") == b"2", "nothing ran"
    await pipe.close()
    await client.aclose()


async def test_the_database_and_password_of_the_url_are_used(redis_server):
    admin = aioredis.Redis.from_url(redis_server.url)
    await admin.config_set("requirepass", "s3cret")
    url = f"redis://:s3cret@{redis_server.host}:{redis_server.port}/3"
    client = aioredis.Redis.from_url(url)
    pipe = RedisPipe.like(client)
    await pipe.call("SET", "where", "db3")
    assert await client.get("where") == b"db3"
    db0 = aioredis.Redis.from_url(f"redis://:s3cret@{redis_server.host}:{redis_server.port}/0")
    assert await db0.get("where") is None
    await db0.aclose()
    wrong = RedisPipe(redis_server.host, redis_server.port, password="wrong")
    with pytest.raises(ConnectionError):
        await wrong.call("PING")
    await pipe.close()
    await client.aclose()
    await admin.aclose()


async def test_tls_and_unix_sockets_are_left_to_redis_py():
    assert RedisPipe.like(aioredis.Redis.from_url("rediss://localhost:6379/0")) is None
    assert RedisPipe.like(aioredis.Redis.from_url("unix:///tmp/redis.sock")) is None


async def test_a_restarted_redis_is_reconnected_and_an_absent_one_fails_fast(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis").start()
    client = aioredis.Redis.from_url(server.url, socket_timeout=5, socket_connect_timeout=2)
    pipe = RedisPipe.like(client)
    assert await pipe.call("PING") == b"PONG"
    server.kill()
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        await pipe.call("PING")
    assert time.monotonic() - started < 2, "an outage answers fast"
    server = EmbeddedRedis(tmp_path / "redis", port=server.port).start()
    try:
        assert await pipe.call("PING") == b"PONG"
    finally:
        await pipe.close()
        await client.aclose()
        server.stop()


def test_a_server_left_on_the_state_dir_hands_over_to_the_next_one(tmp_path):
    """Whoever ran the private Redis was killed outright and left it running: the next
    start on that directory stops it first (two servers appending to one file would
    corrupt it), and what the old one accepted is all there."""
    left_over = EmbeddedRedis(tmp_path / "state").start()
    redis.Redis.from_url(left_over.url).set("accepted", "yes")
    successor = EmbeddedRedis(tmp_path / "state").start()
    try:
        assert left_over.process.wait(5) == 0, "the left-over server was shut down cleanly"
        assert redis.Redis.from_url(successor.url).get("accepted") == b"yes"
    finally:
        successor.stop()
        left_over.stop()
