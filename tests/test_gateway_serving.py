"""The OpenAI surface end to end: the official OpenAI SDK → gateway → worker
agents → simulated engines, all real processes on loopback."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.conftest import MODEL


@pytest.fixture(scope="module")
def sdk(sim_fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim_fleet.url + "/v1", api_key=sim_fleet.api_key, max_retries=0)


def test_streamed_chat_gives_reasoning_then_answer_and_usage(sdk):
    stream = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "How many primes below 20?"}],
        max_tokens=120, stream=True, stream_options={"include_usage": True},
    )
    reasoning, content, ids, usage, finish = [], [], set(), None, None
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            reasoning.append(delta.get("reasoning_content") or "")
            content.append(delta.get("content") or "")
            finish = choice.finish_reason or finish
    assert len(ids) == 1, "one id for the whole answer"
    assert "".join(reasoning).strip(), "DeepSeek-R1 clients read reasoning_content"
    assert "<think>" not in "".join(reasoning) + "".join(content)
    assert usage is not None and usage.completion_tokens == 120 or finish == "stop"
    assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_non_streaming_chat(sdk):
    r = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=40, extra_body={"ignore_eos": True})
    msg = r.choices[0].message
    assert r.object == "chat.completion"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 40
    assert (msg.model_extra or {}).get("reasoning_content")


def test_completions_stream_raw_text_with_think_tags(sim_fleet):
    with sim_fleet.client as c, c.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "Once upon", "max_tokens": 30, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert "text_completion" in lines[0]


def test_vllm_extra_params_pass_through_and_models_are_listed(sdk):
    r = sdk.completions.create(model=MODEL, prompt="a b c", max_tokens=8, extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "ignore_eos": True})
    assert r.usage.completion_tokens == 8
    models = sdk.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].owned_by == "idlegrid-sim", "simulated engines are labelled as such"


def test_requests_spread_over_both_workers(sim_fleet, sdk):
    for _ in range(6):
        sdk.completions.create(model=MODEL, prompt="x", max_tokens=2)
    metrics = httpx.get(sim_fleet.url + "/metrics").text
    assert 'idlegrid_requests_total{route="completions",status="200"}' in metrics
    assert "idlegrid_ttft_seconds_bucket" in metrics


def test_client_disconnect_frees_the_slot(sim_fleet):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "think long"}], "max_tokens": 20000, "ignore_eos": True, "stream": True}
    with sim_fleet.client as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()  # keep the iterator: dropping it closes the connection
        next(lines)
        busy = [w for w in sim_fleet.workers() if w["reserved_requests"] == 1]
        assert len(busy) == 1, "the stream holds a reservation while it runs"
    # Leaving the stream closes the connection: the reservation and the engine's slot free up.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        workers = sim_fleet.workers()
        if sum(w["reserved_requests"] for w in workers) == 0 and sum(w["running"] for w in workers) == 0:
            break
        time.sleep(0.1)
    workers = sim_fleet.workers()
    assert sum(w["reserved_requests"] for w in workers) == 0
    assert sum(w["running"] for w in workers) == 0, "the engine stopped generating for a client that left"


def test_ready_and_admin_listing(sim_fleet):
    r = httpx.get(sim_fleet.url + "/ready")
    assert r.status_code == 200 and r.json()["ready_workers"] == 2
    workers = sim_fleet.workers()
    assert {w["center"] for w in workers} == {"dc-a", "dc-b"}
    for w in workers:
        assert w["engine_kind"] == "sim" and w["engine_pid"]
        assert w["energy_source"] == "modeled"
        assert "engine_api_key" not in w
    r = httpx.get(sim_fleet.url + "/admin/workers")
    assert r.status_code == 401
