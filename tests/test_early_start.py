"""Early starts: at a worker far below its line, the engine is asked while the
request's reservation is still on its way to Redis, and the reservation is
confirmed before the answer's first byte leaves for the client. When it is
refused after all (another gateway filled the worker in the meantime, or
requests started queueing), the engine's work is hung up at once and the
request goes where there is room, with nothing left behind on either side, and
the client sees only that: an answer, or the refusal's own status code. Real
Redis, real simulated engines, a real gateway over HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import redis.asyncio as aioredis

import httpx

from gateway.admission import AdmissionQueue
from gateway.config import GatewayConfig
from gateway.dispatch import Dispatcher, Job, _far_below_line
from gateway.engine_client import EngineClient
from gateway.fleet import READY, RouteRequest, Worker
from gateway.metrics import GatewayMetrics
from gateway.policies import POLICIES, make_policy
from gateway.registry import Registry
from gateway.relay import ClientStream
from gateway.schemas import CompletionRequest, parse_body
from workers.sim.engine import SimConfig, SimEngine
from workers.sim.server import EnginesInThread
from tests.conftest import start_gateway

MODEL = "deepseek-r1-distill-qwen-1.5b"


def job_for(body: dict, request_id: str) -> Job:
    params = parse_body(CompletionRequest, body)
    return Job(kind="completions", params=params, body=body, request_id=request_id,
               route=RouteRequest(model=MODEL, prompt_tokens=4, max_output_tokens=body["max_tokens"], center="dc-a"),
               client=ClientStream("completions", MODEL, request_id, include_usage=False, return_token_ids=False))


def test_only_a_worker_far_below_its_line_is_started_early():
    route = RouteRequest(model=MODEL, prompt_tokens=100, max_output_tokens=900)
    worker = Worker(id="w", center="dc-a", model=MODEL, engine_url="http://x", max_num_seqs=8, kv_capacity_tokens=10_000)
    assert _far_below_line(worker, route)
    assert not _far_below_line(Worker(**{**worker.__dict__, "reserved_requests": 4}), route)  # a fifth would pass half
    assert not _far_below_line(Worker(**{**worker.__dict__, "reserved_tokens": 4_500}), route)  # KV past half
    # A worker of a few slots, even empty: a burst at a few gateways could fill it in one view refresh.
    assert not _far_below_line(Worker(**{**worker.__dict__, "max_num_seqs": 2}), route)


def test_an_early_start_whose_room_was_taken_hangs_up_and_goes_where_there_is_room(redis_url):
    engines = [SimEngine(SimConfig(model=MODEL, time_scale=1.0, max_num_seqs=4)) for _ in range(2)]
    with EnginesInThread(engines) as fleet:

        async def scenario() -> tuple[str, bytes, bool]:
            redis = aioredis.Redis.from_url(redis_url)
            registry = Registry(redis, heartbeat_ttl=60)
            now = await registry.now()
            a, b = (Worker(id=name, center="dc-a", model=MODEL, engine_url=url, state=READY, max_num_seqs=4,
                           kv_capacity_tokens=100_000, last_heartbeat=now) for name, url in zip("ab", fleet.urls))
            await registry.register(a)
            config = GatewayConfig(redis_url=redis_url, center="dc-a", policy="round_robin", heartbeat_ttl_s=60)
            engines_client = EngineClient(connect_timeout_s=2, idle_timeout_s=30)
            dispatcher = Dispatcher(config, registry, engines_client, GatewayMetrics(), {n: make_policy(n) for n in POLICIES})
            view = await dispatcher.refresh()
            assert [w.id for w in view.workers] == ["a"]  # this gateway last saw `a`, empty
            # Meanwhile another gateway fills `a`, and `b` joins the fleet.
            for i in range(4):
                assert (await registry.reserve(a, f"elsewhere-{i}", 100)).ok
            await registry.register(b)

            job = job_for({"model": MODEL, "prompt": "hi", "max_tokens": 20, "stream": True}, "early-1")
            early = await dispatcher.start(job)
            assert early.worker.id == "a" and early.reserving is not None  # asked before Redis answered
            # Redis refuses the room: the engine's work stops as soon as it does, not when
            # the answer's first chunk is about to go out.
            deadline = time.monotonic() + 2
            while await asyncio.to_thread(work_on_a) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert await asyncio.to_thread(work_on_a) == 0
            attempt = await dispatcher.confirm(job, early)  # as the first chunk is about to go out
            body = b"".join([data async for data in attempt.response.chunks()])
            await dispatcher.finish(job, attempt)
            left_on_a = await registry.get("a")
            # Nothing of ours runs on `a`'s engine: it was hung up on (or never asked).
            deadline = time.monotonic() + 3
            while await asyncio.to_thread(work_on_a) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert await asyncio.to_thread(work_on_a) == 0
            await dispatcher.close()
            await engines_client.close()
            await registry.close()
            await redis.aclose()
            assert left_on_a is not None and left_on_a.reserved_requests == 4  # only the other gateway's
            return attempt.worker.id, body, job.early_refused

        def work_on_a() -> int:
            return fleet.run(lambda: len(engines[0].running) + engines[0].num_waiting + engines[0].finished_total["length"])

        served_by, body, early_refused = asyncio.run(scenario())

        assert early_refused, "the request was started early on `a`, and its reservation there refused"
        assert served_by == "b"
        assert body.count(b"data: ") >= 20 and body.rstrip().endswith(b"data: [DONE]")


def test_a_streamed_request_refused_after_its_early_start_gets_the_refusals_status(redis_url):
    """A request waits at another gateway, which this gateway's fleet view cannot
    show: the worker looks empty, the engine is asked early, and Redis refuses the
    room (nobody passes a request in line). The streamed request then waits its
    turn, and when its queue time runs out the client gets a plain 429, not a 200
    whose stream carries an error; the engine is left with nothing of it."""
    server, gw = start_gateway(redis_url, queue_timeout_s=1.0)
    try:
        gw.start_sim_worker("dc-a", time_scale=1.0)
        worker = gw.wait_ready(1)[0]
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 50, "stream": True}
        with gw.client as c:
            with c.stream("POST", "/v1/completions", json=body) as r:  # warms the gateway's fleet view
                assert r.status_code == 200 and r.headers["x-idlegrid-worker"] == worker["id"]
                assert sum(1 for line in r.iter_lines() if line.startswith("data: ")) == 51

            async def wait_elsewhere(action: str) -> None:
                redis = aioredis.Redis.from_url(redis_url)
                queue = AdmissionQueue(redis)
                if action == "join":
                    await queue.enqueue(MODEL, "at-another-gateway", priority=0, api_key="other", center="dc-a", timeout_s=30)
                else:
                    await queue.leave(MODEL, "at-another-gateway")
                await redis.aclose()

            asyncio.run(wait_elsewhere("join"))
            with c.stream("POST", "/v1/completions", json=body) as r:
                refused = (r.status_code, r.headers.get("retry-after"), r.headers.get("x-idlegrid-worker"), r.read())
            assert refused[:3] == (429, "2", None), refused
            assert b'"code":"overloaded"' in refused[3].replace(b" ", b"")
            deadline = time.monotonic() + 5
            while (running := _running(worker["engine_url"])) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert running == 0, "the early-started work was hung up"

            asyncio.run(wait_elsewhere("leave"))
            with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200 and r.headers["x-idlegrid-worker"] == worker["id"]
                assert sum(1 for line in r.iter_lines() if line.startswith("data: ")) == 51
        assert gw.workers()[0]["reserved_requests"] == 0
    finally:
        gw.stop_agents()
        server.stop()


def test_an_early_start_whose_quick_reservation_call_fails_is_served_all_the_same(redis_url):
    """The early start's reservation goes out as a bare call, with none of the
    usual retries (see Registry.reserve_now). When that call fails (here: Redis
    forgot its scripts, as after a restart), the reservation is made again the
    patient way before the answer's first byte: the client sees a whole answer,
    and the room is counted, then given back."""
    server, gw = start_gateway(redis_url)
    try:
        gw.start_sim_worker("dc-a", time_scale=1.0)
        worker = gw.wait_ready(1)[0]
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 50, "stream": True}
        with gw.client as c:
            with c.stream("POST", "/v1/completions", json=body) as r:  # warms the gateway's fleet view and connections
                assert r.status_code == 200 and sum(1 for line in r.iter_lines() if line.startswith("data: ")) == 51

            async def flush_scripts() -> None:
                redis = aioredis.Redis.from_url(redis_url)
                await redis.script_flush()
                await redis.aclose()

            asyncio.run(flush_scripts())
            with c.stream("POST", "/v1/completions", json={**body, "max_tokens": 400}) as r:
                assert r.status_code == 200 and r.headers["x-idlegrid-worker"] == worker["id"]
                lines = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                    if len(lines) == 1:
                        assert gw.workers()[0]["reserved_requests"] == 1, "the answer's room is counted while it streams"
            assert len(lines) == 401 and lines[-1] == "data: [DONE]"
        deadline = time.monotonic() + 5
        while gw.workers()[0]["reserved_requests"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gw.workers()[0]["reserved_requests"] == 0
    finally:
        gw.stop_agents()
        server.stop()


def _running(engine_url: str) -> float:
    """Requests the engine is running, from its vLLM-style /metrics."""
    metrics = httpx.get(engine_url + "/metrics").raise_for_status().text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("vllm:num_requests_running"))


def test_a_client_that_hangs_up_before_its_first_token_frees_the_slot(redis_url):
    """The engine has taken the request but not yet answered (paused here, as a long
    prefill would be): the gateway is waiting for the first chunk when the client
    hangs up. The engine's work is hung up on and the reservation goes back."""
    from tests.test_qualify import RawWorker

    engine = SimEngine(SimConfig(model=MODEL, time_scale=1.0))
    server, gw = start_gateway(redis_url, qualify=False)
    try:
        with EnginesInThread([engine]) as fleet, RawWorker(gw.url, gw.enroll_token("dc-a"), fleet.urls[0]) as worker:
            gw.wait_ready(1)
            httpx.post(fleet.urls[0] + "/pause", params={"mode": "keep"}).raise_for_status()
            held = lambda: fleet.run(lambda: len(engine.held) + len(engine.waiting) + len(engine.running))  # noqa: E731
            body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 50, "stream": True}).encode()
            host, port = gw.url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port))) as client:
                client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                               b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (gw.api_key.encode(), len(body), body))
                wait_until(lambda: held() == 1, "the engine to hold the request")
                assert gw.workers()[0]["reserved_requests"] == 1
            # The client is gone before any byte of its answer (or even a status line) was sent.
            wait_until(lambda: held() == 0, "the engine to drop the abandoned request")
            wait_until(lambda: gw.workers()[0]["reserved_requests"] == 0, "the reservation to be released")
            httpx.post(fleet.urls[0] + "/resume").raise_for_status()
            with gw.client as c:
                r = c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 5})
            assert r.status_code == 200 and r.headers["x-idlegrid-worker"] == worker.id
    finally:
        server.stop()


def wait_until(check, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
