"""The dispatch path under load: a waiting request is placed as soon as room
frees anywhere in the fleet, waiting costs Redis next to nothing, and a slot is
given back when the engine finishes, not when a slow client has read the answer."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time

import httpx
import pytest
import redis
import uvicorn

from gateway import keys
from gateway.app import create_app
from tests.conftest import MODEL, start_gateway, wait_for

LONG = {"model": MODEL, "messages": [{"role": "user", "content": "think"}], "max_tokens": 30000, "ignore_eos": True, "stream": True}
SHORT = {"model": MODEL, "prompt": "hi", "max_tokens": 5}


@pytest.fixture
def two_gateways(redis_url):
    """Two gateways on one Redis, and one worker that runs one sequence at a time."""
    server_a, a = start_gateway(redis_url, queue_timeout_s=10.0)
    server_b, b = start_gateway(redis_url, queue_timeout_s=10.0)
    a.start_sim_worker("dc-a", max_num_seqs=1, time_scale=5.0)
    a.wait_ready(1)
    yield a, b
    a.stop_agents()
    server_a.stop()
    server_b.stop()


def waiting_in_queue(redis_url: str) -> int:
    with redis.Redis.from_url(redis_url) as r:
        return r.zcard(keys.queue(MODEL))


def post(gw, body: dict) -> httpx.Response:
    return httpx.post(gw.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {gw.api_key}"}, timeout=60)


def test_a_waiting_request_starts_when_another_gateway_frees_the_slot(two_gateways):
    a, b = two_gateways
    with b.client as c, c.stream("POST", "/v1/chat/completions", json=LONG) as long_stream:
        lines = long_stream.iter_lines()  # held: dropping it would hang up
        next(lines)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(post, a, SHORT)
            wait_for(lambda: waiting_in_queue(a.redis_url) == 1, 5, "the request to wait in the queue")
            time.sleep(0.3)
            assert not waiting.done(), "it waits while B's client holds the only slot"
            long_stream.close()  # B's client leaves: B releases the slot
            freed_at = time.monotonic()
            r = waiting.result(timeout=10)
            started_after = time.monotonic() - freed_at
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 5
    assert started_after < 1.0, f"A noticed B's release only after {started_after:.2f}s"
    assert waiting_in_queue(a.redis_url) == 0


def test_the_line_is_kept_across_gateways(two_gateways):
    """A frees the slot and has a request waiting, but B's waited longer: B's goes first."""
    a, b = two_gateways

    def timed_post(gw, body: dict) -> tuple[httpx.Response, float]:
        r = post(gw, body)
        return r, time.monotonic()

    with a.client as c, c.stream("POST", "/v1/chat/completions", json=LONG) as long_stream, \
            concurrent.futures.ThreadPoolExecutor(2) as pool:
        lines = long_stream.iter_lines()  # held: dropping it would hang up
        next(lines)
        first = pool.submit(timed_post, b, {**SHORT, "max_tokens": 1000, "ignore_eos": True})
        wait_for(lambda: waiting_in_queue(a.redis_url) == 1, 5, "B's request to wait")
        second = pool.submit(timed_post, a, SHORT)
        wait_for(lambda: waiting_in_queue(a.redis_url) == 2, 5, "A's request to wait behind it")
        long_stream.close()  # A releases the slot
        (r1, first_done), (r2, second_done) = first.result(timeout=30), second.result(timeout=30)
    assert r1.status_code == r2.status_code == 200
    assert first_done < second_done, "A's own waiter took the slot ahead of B's older one"


def commands_run(r: redis.Redis) -> int:
    """Commands Redis has run so far, those inside Lua scripts included."""
    return sum(stats["calls"] for stats in r.info("commandstats").values())


def test_waiting_requests_do_not_poll_redis(redis_url):
    server, gw = start_gateway(redis_url, queue_timeout_s=20.0)
    try:
        gw.start_sim_worker("dc-a", max_num_seqs=1, time_scale=5.0)
        gw.wait_ready(1)
        with gw.client as c, c.stream("POST", "/v1/chat/completions", json=LONG) as long_stream, \
                concurrent.futures.ThreadPoolExecutor(20) as pool, redis.Redis.from_url(redis_url) as r:
            lines = long_stream.iter_lines()  # held: dropping it would hang up
            next(lines)
            waiting = [pool.submit(post, gw, SHORT) for _ in range(20)]
            wait_for(lambda: waiting_in_queue(redis_url) == 20, 10, "20 requests to wait in the queue")
            before = commands_run(r)
            time.sleep(1.0)
            per_second = commands_run(r) - before
            long_stream.close()
            results = [f.result(timeout=30) for f in waiting]
        # Polling every 25 ms, 20 waiters would run 800 scripts a second, each a dozen
        # commands; what is left is the fleet view's refresh, heartbeats and leases.
        assert per_second < 300, f"{per_second} Redis commands in one second with 20 requests waiting"
        assert [x.status_code for x in results] == [200] * 20, "each ran once the slot freed"
    finally:
        gw.stop_agents()
        server.stop()


class SmallBufferGateway:
    """A gateway whose client connections get small kernel send buffers, like a
    client behind a slow link: on loopback the kernel would otherwise buffer
    megabytes for a client that stops reading, and hide what the gateway holds."""

    def __init__(self, config):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)  # accepted connections inherit it
        sock.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(config), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 10, "the gateway to start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def test_reservation_ends_with_the_engine_not_with_a_slow_client(redis_url):
    server, gw = start_gateway(redis_url)
    slow_link = SmallBufferGateway(gw.config)
    try:
        gw.start_sim_worker("dc-a", time_scale=5.0)
        gw.wait_ready(1)
        tokens = 3000  # ~600 KB of chunks: far more than the kernel buffers between gateway and client
        body = {"model": MODEL, "prompt": "go", "max_tokens": tokens, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        small_window = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)])
        with httpx.Client(transport=small_window, timeout=60) as c, \
                c.stream("POST", slow_link.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {gw.api_key}"}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)
            # The client reads nothing more; the engine finishes on its own, and its
            # slot is free while most of the answer still waits for the client.
            wait_for(lambda: gw.workers()[0]["reserved_requests"] == 0, 20, "the reservation to end with the engine's answer")
            chunks = [line for line in lines if line.startswith("data: ")]
        assert chunks[-1] == "data: [DONE]"
        assert json.loads(chunks[-2][6:])["usage"]["completion_tokens"] == tokens, "the client still gets the whole answer"
    finally:
        slow_link.stop()
        gw.stop_agents()
        server.stop()


def test_a_request_waits_for_a_worker_about_to_be_ready_and_hears_at_once_of_one_that_will_not_be():
    """Whether a request with no ready worker waits in the queue (None) or is told 503:
    it waits for a worker waking from sleep, being qualified, or whose heartbeats
    are a few seconds late (a host short of CPU), not for one asleep, draining,
    flagged by its probe, still loading its model, or long silent."""
    from gateway.dispatch import FleetView, _unservable
    from gateway.fleet import Worker

    now = 1_000_000.0

    def alone(state: str, *, silent_s: float = 0.5, excluded: frozenset = frozenset(), **extra: str):
        worker = Worker(id="w", center="dc-a", model=MODEL, engine_url="http://x", state=state,
                        last_heartbeat=now - silent_s, extra=extra)
        error = _unservable(MODEL, excluded, FleetView([worker], redis_time=now, read_at=time.monotonic()))
        return None if error is None else (error.status, error.code)

    assert alone("ready") is None
    assert alone("waking") is None
    assert alone("starting", reported_state="ready") is None  # qualifying
    assert alone("gone", silent_s=4) is None  # late, perhaps only slow
    refused = (503, "no_worker")
    assert alone("gone", silent_s=30) == refused
    assert alone("sleeping") == refused
    assert alone("draining") == refused
    assert alone("starting", reported_state="ready", flagged="1") == refused
    assert alone("starting", reported_state="ready", cordoned="1") == refused
    assert alone("starting", reported_state="starting") == refused  # the engine is still loading
    assert alone("waking", excluded=frozenset({"w"})) == refused  # it failed this request already
    assert alone("gone", silent_s=4, excluded=frozenset({"w"})) == refused
