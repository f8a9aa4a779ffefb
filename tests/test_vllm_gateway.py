"""The gateway over real vLLM (CPU build, the tiny model the tests build):
OpenAI surface, reasoning as `reasoning_content`, and answers that survive an
engine aborting its requests, resumed exactly on the other vLLM worker."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.conftest import start_gateway
from tests.vllm_server import start_tiny_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]  # two vLLM servers start here


def attach_worker(gw, engine, center: str) -> subprocess.Popen:
    """`idlegrid worker --engine-url`: the agent attaches to a running vLLM."""
    cmd = [sys.executable, "-m", "gateway.cli", "worker", "--gateway", gw.url, "--token", gw.enroll_token(center),
           "--center", center, "--engine-url", engine.base_url, "--engine-api-key", engine.api_key, "--drain-timeout", "5"]
    agent = subprocess.Popen(cmd, start_new_session=True)
    gw.agents.append(agent)
    return agent


@pytest.fixture(scope="module")
def vllm_fleet(vllm_server, tmp_path_factory):
    """A gateway with two real vLLM workers: the session's server and a second one."""
    from gateway.embedded_redis import EmbeddedRedis

    second = start_tiny_vllm(tmp_path_factory.mktemp("vllm2"))
    redis = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    # Two vLLM servers take both cores of a 2-core CI machine, and this gateway runs in
    # the test process beside four streaming client threads: heartbeats (and admin
    # calls) can be late by many seconds there, which is not what this test is about.
    server, gw = start_gateway(redis.url, queue_timeout_s=30.0, engine_idle_timeout_s=120.0, heartbeat_ttl_s=30.0)
    attach_worker(gw, vllm_server.engine, "dc-a")
    attach_worker(gw, second.engine, "dc-b")
    gw.wait_ready(2, timeout=120)
    # The gateway object itself (it runs in this process): what it is relaying right now
    # is read there, not asked over HTTP of a gateway busy beside two vLLM servers.
    gw.inside = server.server.config.app.state.gateway
    yield gw, [vllm_server, second]
    gw.stop_agents()
    server.stop()
    redis.stop()
    second.stop()


def test_chat_through_gateway_over_vllm(vllm_fleet):
    gw, engines = vllm_fleet
    model = engines[0].model
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.api_key, max_retries=0)
    reasoning, content = "", ""
    usage = None
    for chunk in sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=200,
                                             temperature=0, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            extra = choice.delta.model_extra or {}
            reasoning += extra.get("reasoning_content") or ""
            content += choice.delta.content or ""
    assert reasoning, "vLLM's delta.reasoning reaches the client as reasoning_content"
    assert content and "</think>" not in content
    assert usage.completion_tokens > 0
    reply = sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=200, temperature=0)
    assert reply.choices[0].message.content == content, "stream and non-stream give the same greedy answer"
    assert (reply.choices[0].message.model_extra or {}).get("reasoning_content") == reasoning
    # The engine's own refusal (prompt + max_tokens beyond its context) comes back as a 400.
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=100000)


def _stream(gw, model: str, i: int, request_id: str | None = None) -> tuple[str, str, int]:
    body = {"model": model, "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 1500,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    reasoning, content, tokens = [], [], 0
    with httpx.Client(timeout=120) as c, c.stream("POST", gw.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {gw.api_key}", **({"X-Request-Id": request_id} if request_id else {})}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    reasoning.append(choice["delta"].get("reasoning_content") or "")
                    content.append(choice["delta"].get("content") or "")
    return "".join(reasoning), "".join(content), tokens


def test_paused_vllm_worker_hands_its_streams_to_the_other(vllm_fleet):
    gw, engines = vllm_fleet
    model = engines[0].model
    # Eight answers, about four per engine: a batch that size decodes slowly enough on
    # 2 cores that the pause below (seconds, as vLLM drains) lands while they stream.
    n = 8
    reference = [_stream(gw, model, i) for i in range(n)]

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(_stream, gw, model, i, f"paused-{i}") for i in range(n)]
        # Pause a worker while its engine is streaming answers. The tiny model writes
        # 1,500 tokens in about a second, and the clients (threads beside the in-process
        # gateway, on 2 cores the engines keep busy) may see them only late and in
        # bursts: the gateway's own open engine streams say when.
        # Every request has its engine stream before the pause, so that the pause breaks
        # streams under way. (One placed on the paused engine afterwards would be held
        # there, silent, until its agent noticed the pause made behind its back, about a
        # second, and the gateway's stream watchdog moved it: a slower path, tested on
        # the simulated engine in test_reclaim.py.)
        streams = gw.inside.dispatcher.streams
        opened: set = set()  # the Attempts themselves: held, so none is mistaken for another
        deadline = time.monotonic() + 120
        # (One that ended before this thread saw it, on a host starved of CPU, was placed too.)
        while len({a.request_id for a in opened} | {f"paused-{i}" for i, f in enumerate(futures) if f.done()}) < n \
                and time.monotonic() < deadline:
            opened.update(list(streams))
            time.sleep(0.001)
        by_worker: dict[str, int] = {}
        for attempt in list(streams):
            by_worker[attempt.worker.engine_url] = by_worker.get(attempt.worker.engine_url, 0) + 1
        assert by_worker, "no engine was streaming"
        busy = max(by_worker, key=by_worker.__getitem__)
        # vLLM answers /pause once its engine has aborted and drained: seconds on 2 busy cores.
        r = httpx.post(busy + "/pause", params={"mode": "abort"}, timeout=60)
        assert r.status_code == 200
        try:
            results = [f.result(timeout=180) for f in futures]
        finally:
            httpx.post(busy + "/resume", timeout=60)
    # Every answer ran its full length with no error: nothing lost, nothing doubled. (Text
    # identity is proven on the deterministic simulated engine in test_migration.py; the
    # tiny random-weight model's float32 CPU logits have near-ties that a different batch
    # can tip, so only the pre-break prefix is compared here.)
    for (ref_r, ref_c, _), (r, c, n) in zip(reference, results):
        assert n == 1500, "usage counts the whole answer across both engines"
        assert r and (r + c)[:20] == (ref_r + ref_c)[:20]
    metrics = httpx.get(gw.url + "/metrics").text
    assert any(line.startswith("idlegrid_migrations_total") and not line.endswith(" 0.0") for line in metrics.splitlines())


def test_sleep_and_wake_returns_worker_to_service(vllm_fleet):
    gw, engines = vllm_fleet
    engine = engines[1]
    assert httpx.post(engine.base_url + "/sleep", params={"level": 1}, timeout=60).status_code == 200
    assert httpx.get(engine.base_url + "/is_sleeping").json()["is_sleeping"] is True
    assert httpx.post(engine.base_url + "/wake_up", timeout=60).status_code == 200
    assert httpx.get(engine.base_url + "/is_sleeping").json()["is_sleeping"] is False
    r = httpx.post(engine.base_url + "/v1/completions", json={"model": engine.model, "prompt": "a", "max_tokens": 4},
                   headers={"Authorization": f"Bearer {engine.api_key}"}, timeout=60)
    assert r.status_code == 200
    with gw.client as c:
        for _ in range(4):
            assert c.post("/v1/completions", json={"model": engine.model, "prompt": "b", "max_tokens": 4}).status_code == 200
