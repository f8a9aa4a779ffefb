"""Late binding: requests wait in the Redis admission queue while no worker has
room, leave it when their client hangs up, time out with 429, and several
gateways on one Redis never put more on a worker than it can hold."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import threading
import time

import httpx
import pytest

from gateway.embedded_redis import free_port
from tests.conftest import MODEL, start_gateway

LONG = {"model": MODEL, "messages": [{"role": "user", "content": "think"}], "max_tokens": 30000, "ignore_eos": True, "stream": True}
SHORT = {"model": MODEL, "prompt": "hi", "max_tokens": 5}


@pytest.fixture
def one_slot_gateway(redis_url):
    """A gateway whose only worker runs one sequence at a time."""
    server, gw = start_gateway(redis_url, queue_timeout_s=3.0)
    gw.start_sim_worker("dc-a", max_num_seqs=1, time_scale=5.0)
    gw.wait_ready(1)
    yield gw
    gw.stop_agents()
    server.stop()


def queue_depth(gw) -> float:
    """The queue depth an autoscaler reads: a series present (0 when nobody waits)."""
    depths = [float(line.rsplit(" ", 1)[1]) for line in httpx.get(gw.url + "/metrics").text.splitlines()
              if line.startswith("idlegrid_queue_depth{")]
    assert len(depths) == 1, "one series: the fleet's one model at the gateway's center"
    return depths[0]


def test_waiting_request_runs_when_the_slot_frees(one_slot_gateway):
    gw = one_slot_gateway
    with gw.client as c, c.stream("POST", "/v1/chat/completions", json=LONG) as long_stream:
        lines = long_stream.iter_lines()  # held: dropping it would hang up
        next(lines)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(lambda: httpx.post(gw.url + "/v1/completions", json=SHORT, headers={"Authorization": f"Bearer {gw.api_key}"}, timeout=30))
            deadline = time.monotonic() + 3
            while queue_depth(gw) < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert queue_depth(gw) == 1, ("the second request waits in the queue, not on the GPU")
            assert not waiting.done()
            long_stream.close()  # the first client leaves: its slot frees
            r = waiting.result(timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 5
    assert queue_depth(gw) == 0


def test_queue_timeout_is_429_with_retry_after(one_slot_gateway):
    gw = one_slot_gateway
    with gw.client as c, c.stream("POST", "/v1/chat/completions", json={**LONG, "max_tokens": 30000}) as long_stream:
        lines = long_stream.iter_lines()  # held: dropping it would hang up
        next(lines)
        started = time.monotonic()
        r = c.post("/v1/completions", json=SHORT)
        waited = time.monotonic() - started
    assert r.status_code == 429
    assert r.headers["retry-after"]
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert 2.5 <= waited < 10
    assert queue_depth(gw) == 0


def test_client_that_hangs_up_leaves_the_queue(one_slot_gateway):
    gw = one_slot_gateway
    with gw.client as c, c.stream("POST", "/v1/chat/completions", json={**LONG, "max_tokens": 30000}) as long_stream:
        lines = long_stream.iter_lines()  # held: dropping it would hang up
        next(lines)
        impatient = httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {gw.api_key}"}, timeout=0.5)
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/completions", json=SHORT)
        impatient.close()
        deadline = time.monotonic() + 3
        while queue_depth(gw) > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert queue_depth(gw) == 0


def test_three_gateways_never_over_reserve(redis_url, tmp_path):
    """Bursts at three gateway processes on one Redis: no engine ever holds more
    than its max_num_seqs, so nothing queues inside an engine."""
    server, gw = start_gateway(redis_url, queue_timeout_s=20.0)
    gateways = []
    try:
        for _ in range(2):
            port = free_port()
            proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "--log-level", "WARNING", "gateway", "--redis", redis_url, "--port", str(port), "--admin-token", gw.admin_token])
            gateways.append((proc, f"http://127.0.0.1:{port}"))
        gw.start_sim_worker("dc-a", max_num_seqs=2, time_scale=10.0, seed=1)
        gw.start_sim_worker("dc-a", max_num_seqs=2, time_scale=10.0, seed=2)
        gw.wait_ready(2)
        urls = [gw.url] + [u for _, u in gateways]
        for url in urls[1:]:
            deadline = time.monotonic() + 15
            while True:
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline
                time.sleep(0.1)
        engines = [w["engine_url"] for w in gw.workers()]
        peak = {"running": 0, "waiting": 0}
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                for url in engines:
                    text = _engine_metrics(url)
                    for line in text.splitlines():
                        if line.startswith("vllm:num_requests_running{"):
                            peak["running"] = max(peak["running"], float(line.rsplit(" ", 1)[1]))
                        if line.startswith("vllm:num_requests_waiting{"):
                            peak["waiting"] = max(peak["waiting"], float(line.rsplit(" ", 1)[1]))
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        body = {"model": MODEL, "prompt": "burst", "max_tokens": 30, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            futures = [pool.submit(httpx.post, urls[i % 3] + "/v1/completions", json=body, headers={"Authorization": f"Bearer {gw.api_key}"}, timeout=60) for i in range(24)]
            statuses = [f.result().status_code for f in futures]
        stop.set()
        watcher.join()
        assert statuses == [200] * 24
        assert peak["running"] <= 2, peak
        assert peak["waiting"] == 0, f"an engine queued work beyond its slots: {peak}"
        assert all(w["reserved_requests"] == 0 for w in gw.workers())
    finally:
        for proc, _ in gateways:
            proc.terminate()
            proc.wait(10)
        gw.stop_agents()
        server.stop()


def _engine_metrics(engine_url: str) -> str:
    """Engines' completion routes need the gateway-held API key; /metrics is open, as on vLLM."""
    return httpx.get(engine_url + "/metrics", timeout=5).text


def test_queue_order_is_priority_then_fair_across_keys_then_arrival(redis_url):
    """The shared line itself (real Redis): FIFO within a key however the line grows
    and shrinks, each key's n-th waiting request beside the other keys' n-th, and a
    lower `priority` value ahead of everything else."""
    import asyncio

    import redis.asyncio as aioredis

    from gateway import keys
    from gateway.admission import AdmissionQueue

    async def scenario() -> list[list[str]]:
        redis = aioredis.Redis.from_url(redis_url)
        queue = AdmissionQueue(redis)
        model = "order-test"

        async def join(request_id: str, key: str, priority: int = 0) -> None:
            await queue.enqueue(model, request_id, priority=priority, api_key=key, center="dc-a", timeout_s=30)

        async def line() -> list[str]:
            return [m.decode() for m in await redis.zrange(keys.queue(model), 0, -1)]

        seen = []
        # One busy key: five wait, four are served, then more arrive. The one left
        # from the long line must stay ahead of the newcomers (it did not: its turn
        # was the count of its key's waiting requests when it joined).
        for i in range(5):
            await join(f"a{i}", "key-a")
        for i in range(4):
            await queue.leave(model, f"a{i}")
        for i in range(5, 8):
            await join(f"a{i}", "key-a")
        seen.append(await line())
        # Another key joins behind a's backlog: its first request goes right after
        # a's current head, its second beside a's next.
        await join("b0", "key-b")
        await join("b1", "key-b")
        seen.append(await line())
        # A more urgent request (vLLM's convention: lower value first) goes first.
        await join("urgent", "key-c", priority=-1)
        seen.append(await line())
        await redis.aclose()
        return seen

    fifo, fair, urgent = asyncio.run(scenario())
    assert fifo == ["a4", "a5", "a6", "a7"]
    assert fair == ["a4", "b0", "a5", "b1", "a6", "a7"]
    assert urgent[0] == "urgent" and urgent[1:] == fair
