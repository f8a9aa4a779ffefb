"""The simulated engine, over real HTTP on loopback: vLLM's wire format, exact
continuation, batching, lifecycle, metrics and the performance model."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from workers.sim import EnginesInThread, SimEngine
from workers.sim import cli as sim_cli
from workers.sim.profiles import GPUS, LLAMA_3_1_8B, MODELS, ModelProfile, PerfModel
from workers.sim.tokens import END_THINK, EOS, THINK

MODEL = "deepseek-r1-distill-qwen-1.5b"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fast():
    """A quick engine with a short context, so every R1 answer ends within ~1.3k tokens."""
    with EnginesInThread([SimEngine(time_scale=1000, max_model_len=2048, api_key="sk-sim")]) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def client(fast):
    with httpx.Client(base_url=fast.urls[0], headers={"Authorization": "Bearer sk-sim"}, timeout=30) as c:
        yield c


@pytest.fixture
def serve():
    """Start engines of your own for one test: serve(time_scale=..., ...) -> base URL."""
    started: list[EnginesInThread] = []

    def start(**config) -> str:
        fleet = EnginesInThread([SimEngine(**config)]).start()
        started.append(fleet)
        return fleet.urls[0]

    yield start
    for fleet in started:
        fleet.stop()


def events(response: httpx.Response) -> list[dict | str]:
    """Parsed SSE events of a streamed response; "[DONE]" stays a string."""
    out: list[dict | str] = []
    for line in response.iter_lines():
        if line:
            assert line.startswith("data: "), line
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def stream(client: httpx.Client, path: str, body: dict) -> list[dict | str]:
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return events(response)


def chat_body(text: str = "Why is the sky blue?", **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics")


# --- wire format -----------------------------------------------------------------------------


def test_streaming_chat_puts_reasoning_then_content_and_ends_with_usage(client):
    chunks = stream(client, "/v1/chat/completions", chat_body(seed=3, stream_options={"include_usage": True}))

    assert chunks[-1] == "[DONE]"
    first, *middle, usage_chunk, _ = chunks
    assert first["object"] == "chat.completion.chunk" and first["model"] == MODEL
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["prompt_token_ids"] is None  # vLLM sends the key, null unless asked
    assert all(chunk["id"] == first["id"] and chunk["id"].startswith("chatcmpl-") for chunk in chunks[:-1])

    deltas = [chunk["choices"][0]["delta"] for chunk in middle]
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert all(d.get("reasoning") is None for d in deltas[first_content + 1:])
    reasoning = "".join(d.get("reasoning") or "" for d in deltas)
    answer = "".join(d.get("content") or "" for d in deltas)
    assert answer.startswith("\n\n") and len(answer.split()) > 3 and len(reasoning.split()) > 100
    assert "</think>" not in answer + reasoning and "<think>" not in answer + reasoning
    assert middle[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in middle[:-1])

    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    same = client.post("/v1/chat/completions", json=chat_body(seed=3)).json()["usage"]
    assert usage["completion_tokens"] == same["completion_tokens"] >= len(middle)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 0}  # vLLM counts 0 when <think> is in the prompt
    assert usage_chunk["system_fingerprint"].startswith("idlegrid-sim-")


def test_non_streaming_chat_has_reasoning_and_content(client):
    response = client.post("/v1/chat/completions", json=chat_body(seed=3))
    assert response.status_code == 200
    body = response.json()
    message = body["choices"][0]["message"]
    assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] == "stop"
    assert message["role"] == "assistant" and len(message["reasoning"]) > 100 and message["content"].startswith("\n\n")
    assert body["prompt_token_ids"] is None and body["choices"][0]["token_ids"] is None

    streamed = stream(client, "/v1/chat/completions", chat_body(seed=3))
    deltas = [c["choices"][0]["delta"] for c in streamed[1:-1]]
    assert "".join(d.get("reasoning") or "" for d in deltas) == message["reasoning"]
    assert "".join(d.get("content") or "" for d in deltas) == message["content"]


def test_return_token_ids_where_vllm_puts_them(client):
    chunks = stream(client, "/v1/chat/completions", chat_body(seed=5, return_token_ids=True, max_tokens=1100))
    first, *middle, done = chunks
    assert done == "[DONE]"
    prompt_ids = first["prompt_token_ids"]
    assert prompt_ids[-3:] == [151645, THINK, prompt_ids[-1]]  # "<｜Assistant｜><think>\n"
    assert "token_ids" not in first["choices"][0]
    assert all("prompt_token_ids" not in chunk for chunk in middle)
    output = [t for chunk in middle for t in chunk["choices"][0]["token_ids"]]
    assert len(output) == 1100 and END_THINK in output
    # A delta that is only </think> carries no text (vLLM's deepseek_r1 parser returns
    # nothing for it, and vLLM still sends the chunk for its token id).
    think_end = next(c["choices"][0] for c in middle if END_THINK in c["choices"][0]["token_ids"])
    if think_end["token_ids"] == [END_THINK]:
        assert think_end["delta"] == {}
    assert "</think>" not in json.dumps([c["choices"][0]["delta"] for c in middle])

    completion = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": prompt_ids, "max_tokens": 1100, "seed": 5, "return_token_ids": True}
    ).json()
    choice = completion["choices"][0]
    assert choice["prompt_token_ids"] == prompt_ids and choice["token_ids"] == output
    assert completion["usage"] == {
        "prompt_tokens": len(prompt_ids), "total_tokens": len(prompt_ids) + 1100, "completion_tokens": 1100,
        "prompt_tokens_details": None, "completion_tokens_details": None,
    }

    streamed = stream(
        client, "/v1/completions", {"model": MODEL, "prompt": prompt_ids, "max_tokens": 20, "seed": 5, "return_token_ids": True}
    )
    assert streamed[0]["choices"][0]["prompt_token_ids"] == prompt_ids
    assert all(c["choices"][0]["prompt_token_ids"] is None for c in streamed[1:-1])
    assert [t for c in streamed[:-1] for t in c["choices"][0]["token_ids"]] == output[:20]


@pytest.mark.parametrize("cut", ["reasoning", "boundary", "after_boundary", "answer"])
def test_continuation_from_own_tokens_is_exact(client, cut):
    chunks = stream(client, "/v1/chat/completions", chat_body("Plan a trip to Mars.", seed=11, return_token_ids=True))
    prompt_ids = chunks[0]["prompt_token_ids"]
    output = [t for c in chunks[1:-1] for t in c["choices"][0]["token_ids"]]
    end = output.index(END_THINK)
    assert output[-1] == EOS and len(output) - end > 20
    k = {"reasoning": end // 2, "boundary": end, "after_boundary": end + 1, "answer": end + 12}[cut]

    rest = client.post("/v1/completions", json={
        "model": MODEL, "prompt": prompt_ids + output[:k], "max_tokens": len(output) - k,
        "seed": 11, "return_token_ids": True,
    }).json()["choices"][0]
    assert rest["token_ids"] == output[k:]
    assert rest["finish_reason"] == "stop"

    # Text matches too: chat's reasoning + "</think>" + content is the raw completion text.
    whole = client.post("/v1/completions", json={
        "model": MODEL, "prompt": prompt_ids, "max_tokens": len(output), "seed": 11,
    }).json()["choices"][0]["text"]
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    reasoning = "".join(d.get("reasoning") or "" for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    assert whole == reasoning + "</think>" + content
    head = client.post("/v1/completions", json={
        "model": MODEL, "prompt": prompt_ids, "max_tokens": k, "seed": 11,
    }).json()["choices"][0]["text"]
    assert head + rest["text"] == whole


def test_different_seeds_give_different_text_and_lengths(client):
    a = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 64, "seed": 1}).json()
    b = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 64, "seed": 2}).json()
    assert a["choices"][0]["text"].startswith("<think>\n")  # a raw prompt starts by thinking
    assert a["choices"][0]["text"] != b["choices"][0]["text"]


def test_max_tokens_finish_reasons_and_ignore_eos(client):
    short = client.post("/v1/chat/completions", json=chat_body(max_tokens=7, return_token_ids=True)).json()
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 7
    assert len(short["choices"][0]["token_ids"]) == 7 and short["choices"][0]["message"]["content"] is None

    both = client.post("/v1/chat/completions", json=chat_body(max_tokens=50, max_completion_tokens=9)).json()
    assert both["usage"]["completion_tokens"] == 9  # max_completion_tokens wins, as in vLLM

    default = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi there"}).json()
    assert default["usage"]["completion_tokens"] == 16  # vLLM's default for /v1/completions

    natural = client.post("/v1/chat/completions", json=chat_body(seed=9, return_token_ids=True)).json()
    natural_ids = natural["choices"][0]["token_ids"]
    assert natural["choices"][0]["finish_reason"] == "stop" and natural_ids[-1] == EOS

    longer = len(natural_ids) + 40
    forced = client.post("/v1/chat/completions", json=chat_body(seed=9, return_token_ids=True, ignore_eos=True, max_tokens=longer)).json()
    forced_ids = forced["choices"][0]["token_ids"]
    assert forced["choices"][0]["finish_reason"] == "length" and len(forced_ids) == longer
    assert forced_ids[: len(natural_ids)] == natural_ids and THINK in forced_ids[len(natural_ids):]

    near_limit = client.post("/v1/completions", json={"prompt": list(range(300, 310)) * 204, "max_tokens": 100}).json()
    assert near_limit["usage"]["completion_tokens"] == 2048 - 2040  # clipped to the context left


def test_models_health_and_info_say_simulated(client, fast):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    card = models["data"][0]
    assert card["id"] == MODEL and card["owned_by"] == "idlegrid-sim" and card["max_model_len"] == 2048
    assert httpx.get(fast.urls[0] + "/health").status_code == 200  # open without the key, like vLLM
    info = client.get("/v1/sim/info").json()
    assert info["simulated"] is True and info["gpu"]["id"] == "h100" and info["model"]["id"] == MODEL
    assert set(info["profiles"]["gpus"]) >= {"h100", "h200", "h20", "a800", "l40s", "910b", "rtx4090"}
    assert info["kv_capacity_tokens"] > 1_000_000 and info["time_scale"] == 1000
    assert 1 < info["tpot_base_ms"] < 3 and 0 < info["tpot_ms_per_1k_kv"] < 0.1


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/chat/completions", b"{not json", 400, "body.1"),
        ("/v1/chat/completions", chat_body(n=0), 400, None),
        ("/v1/chat/completions", b"[1, 2]", 400, "body"),
        ("/v1/chat/completions", {"messages": []}, 400, None),
        ("/v1/chat/completions", {"model": MODEL}, 400, "body.messages"),
        ("/v1/chat/completions", {"messages": "hello"}, 400, "body.messages"),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, "body.messages.0.role"),
        ("/v1/chat/completions", chat_body(max_tokens=0), 400, "max_tokens"),
        ("/v1/chat/completions", chat_body(max_tokens=5000), 400, "max_tokens"),
        ("/v1/chat/completions", chat_body(max_completion_tokens=-1), 400, "max_tokens"),
        ("/v1/chat/completions", chat_body(max_tokens="many"), 400, "body.max_tokens"),
        ("/v1/chat/completions", chat_body(temperature=-1), 400, "temperature"),
        ("/v1/chat/completions", chat_body(n=2), 400, "n"),
        ("/v1/chat/completions", chat_body(stream_options={"include_usage": True}), 400, "stream_options"),
        ("/v1/chat/completions", {**chat_body(), "model": "gpt-4"}, 404, "model"),
        ("/v1/completions", {"prompt": []}, 400, None),
        ("/v1/completions", {"prompt": [1, 2, 10**7]}, 400, None),
        ("/v1/completions", {"prompt": [1, -2]}, 400, None),
        ("/v1/completions", {"prompt": ["a", "b"]}, 400, "body.prompt"),
        ("/v1/completions", {"prompt": [300] * 2048}, 400, None),
        ("/v1/completions", {"prompt": [300] * 2049}, 400, "input_tokens"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(client, path, body, status, param):
    if isinstance(body, bytes):
        response = client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = client.post(path, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["param"] == param and error["message"]


def test_json_content_type_is_required_like_vllm(client):
    response = client.post("/v1/completions", content=json.dumps({"prompt": "x"}).encode())
    assert response.status_code == 400
    assert response.json()["error"]["message"].endswith("Only 'application/json' is allowed")


def test_api_key_guards_v1_like_vllm(fast):
    url = fast.urls[0]
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).json() == {"error": "Unauthorized"}
    assert httpx.get(url + "/metrics").status_code == 200
    assert httpx.get(url + "/nothing-here").json() == {"detail": "Not Found"}


# --- batching, disconnects, lifecycle ---------------------------------------------------------


async def test_third_request_waits_and_a_disconnect_frees_its_slot(serve):
    url = serve(time_scale=2, max_num_seqs=2)
    body = chat_body(ignore_eos=True, max_tokens=5000, stream=True)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:

        async def gauges() -> tuple[float, float, float]:
            text = (await http.get("/metrics")).text
            return (
                metric(text, "vllm:num_requests_running"),
                metric(text, "vllm:num_requests_waiting"),
                metric(text, "vllm:kv_cache_usage_perc"),
            )

        async def until(expected: tuple[float, float]) -> tuple[float, float, float]:
            for _ in range(250):
                values = await gauges()
                if values[:2] == expected:
                    return values
                await asyncio.sleep(0.02)
            raise AssertionError(f"expected running/waiting {expected}, last {values}")

        a = await http.send(http.build_request("POST", "/v1/chat/completions", json=body), stream=True)
        b = await http.send(http.build_request("POST", "/v1/chat/completions", json=body), stream=True)
        c = await http.send(http.build_request("POST", "/v1/chat/completions", json=body), stream=True)
        _, _, kv = await until((2, 1))
        assert 0 < kv < 0.01

        c_lines = c.aiter_lines()
        await a.aclose()  # the client goes away mid-stream
        await until((2, 0))
        first = json.loads((await anext(c_lines))[len("data: "):])
        assert first["choices"][0]["delta"]["role"] == "assistant"
        await b.aclose()
        await c.aclose()
        await until((0, 0))


async def data_lines(response: httpx.Response):
    async for line in response.aiter_lines():
        if line:
            yield line[len("data: "):]


async def test_non_streaming_client_that_leaves_frees_its_slot(serve):
    url = serve(time_scale=1)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http, httpx.AsyncClient(base_url=url, timeout=30) as admin:
        pending = asyncio.create_task(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 20000, "ignore_eos": True}))
        await until_metric(admin, "vllm:num_requests_running", 1)
        pending.cancel()  # the client gives up: its connection closes
        await until_metric(admin, "vllm:num_requests_running", 0)
        assert metric((await admin.get("/metrics")).text, "vllm:request_success_total", finished_reason="abort") == 1


def test_extra_latency_delays_every_response_in_simulated_time(serve):
    url = serve(time_scale=2, extra_latency_ms=400)
    started = time.monotonic()
    assert httpx.get(url + "/health").status_code == 200
    assert 0.19 < time.monotonic() - started < 2  # 400 simulated ms at time scale 2


async def test_pause_abort_ends_streams_with_partial_output(serve):
    url = serve(time_scale=1)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        body = chat_body(
            stream=True, ignore_eos=True, max_tokens=20000, return_token_ids=True, stream_options={"include_usage": True},
        )
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = data_lines(response)
            received = [await anext(lines) for _ in range(5)]
            assert (await http.post("/pause", params={"mode": "abort"})).json() == {"status": "paused"}
            received += [line async for line in lines]
        assert received[-1] == "[DONE]"
        chunks = [json.loads(line) for line in received[:-1]]
        final = chunks[-2]["choices"][0]
        assert final["finish_reason"] == "abort" and final["stop_reason"] is None
        assert final["token_ids"]  # like vLLM's, the abort chunk carries the step's last token
        tokens = sum(len(c["choices"][0]["token_ids"]) for c in chunks[1:-1])
        assert 4 <= tokens < 20000 and chunks[-1]["usage"]["completion_tokens"] == tokens

        assert (await http.get("/is_paused")).json() == {"is_paused": True}
        assert (await http.post("/pause", params={"mode": "later"})).status_code == 400
        # While paused, new requests are accepted and wait, as vLLM queues them.
        assert (await http.get("/is_sleeping")).json() == {"is_sleeping": True}  # vLLM says so while paused
        later = asyncio.create_task(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}))
        await until_held(http, 1)
        assert not later.done()
        assert metric((await http.get("/metrics")).text, "vllm:num_requests_waiting") == 0  # held: neither
        assert (await http.post("/resume")).json() == {"status": "resumed"}
        assert (await later).json()["choices"][0]["finish_reason"] == "length"
        assert (await http.get("/is_paused")).json() == {"is_paused": False}
        text = (await http.get("/metrics")).text
        assert metric(text, "vllm:request_success_total", finished_reason="abort") == 1


async def test_pause_keep_freezes_and_pause_wait_drains(serve):
    url = serve(time_scale=20)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        body = {"prompt": "x", "max_tokens": 4000, "ignore_eos": True, "return_token_ids": True}
        first = asyncio.create_task(http.post("/v1/completions", json=body))
        await until_metric(http, "vllm:generation_tokens_total", 20, at_least=True)
        assert (await http.post("/pause", params={"mode": "keep"})).json() == {"status": "paused"}
        frozen = metric((await http.get("/metrics")).text, "vllm:generation_tokens_total")
        await asyncio.sleep(0.2)
        assert metric((await http.get("/metrics")).text, "vllm:generation_tokens_total") == frozen < 4000
        assert metric((await http.get("/metrics")).text, "vllm:num_requests_running") == 1
        await http.post("/resume")
        kept = (await first).json()["choices"][0]
        assert kept["finish_reason"] == "length" and len(kept["token_ids"]) == 4000

        second = asyncio.create_task(http.post("/v1/completions", json=body))
        await until_metric(http, "vllm:num_requests_running", 1)
        assert (await http.post("/pause", params={"mode": "wait"})).json() == {"status": "paused"}
        # /pause?mode=wait answers once in-flight requests are done.
        assert metric((await http.get("/metrics")).text, "vllm:generation_tokens_total") == 8000
        assert (await second).json()["choices"][0]["finish_reason"] == "length"
        await http.post("/resume")


async def test_non_streaming_request_aborted_returns_partial_text(serve):
    url = serve(time_scale=1)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        pending = asyncio.create_task(http.post("/v1/completions", json={
            "prompt": "Tell me a story", "max_tokens": 20000, "ignore_eos": True,
        }))
        await until_metric(http, "vllm:generation_tokens_total", 5, at_least=True)
        await http.post("/pause", params={"mode": "abort"})
        body = (await pending).json()
        assert body["choices"][0]["finish_reason"] == "abort"
        assert body["choices"][0]["text"].startswith("<think>") and 5 <= body["usage"]["completion_tokens"] < 20000


async def test_sleep_takes_modelled_time_and_requests_wait_for_wake_up(serve):
    url = serve(time_scale=1, model="deepseek-r1-distill-qwen-14b")  # 30 GB of weights over a 55 GB/s link
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        running = asyncio.create_task(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 20000}))
        await until_metric(http, "vllm:num_requests_running", 1)
        started = time.monotonic()
        assert (await http.post("/sleep", params={"level": 1})).json() == {"status": "sleeping", "level": 1}
        assert 0.45 < time.monotonic() - started < 3
        assert (await running).json()["choices"][0]["finish_reason"] == "abort"  # sleep aborts by default
        assert (await http.get("/is_sleeping")).json() == {"is_sleeping": True}
        assert (await http.get("/is_paused")).json() == {"is_paused": True}
        text = (await http.get("/metrics")).text
        assert metric(text, "vllm:engine_sleep_state", sleep_state="weights_offloaded") == 1
        assert metric(text, "vllm:engine_sleep_state", sleep_state="awake") == 0
        assert metric(text, "vllm:kv_cache_usage_perc") == 0
        assert (await http.post("/sleep", params={"level": 7})).status_code == 400

        later = asyncio.create_task(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}))
        await until_held(http, 1)
        started = time.monotonic()
        assert (await http.post("/wake_up")).json() == {"status": "awake", "tags": None}
        assert 0.45 < time.monotonic() - started < 3
        assert (await later).json()["usage"]["completion_tokens"] == 2
        assert (await http.get("/is_sleeping")).json() == {"is_sleeping": False}
        assert (await http.get("/is_paused")).json() == {"is_paused": False}


async def until_held(http: httpx.AsyncClient, count: int) -> None:
    """Wait until `count` requests are held by a pause (vLLM's metrics do not show them)."""
    for _ in range(250):
        if (await http.get("/v1/sim/info")).json()["held_requests"] == count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never {count} held requests")


async def until_metric(http: httpx.AsyncClient, name: str, value: float, at_least: bool = False) -> None:
    for _ in range(250):
        current = metric((await http.get("/metrics")).text, name)
        if current == value or (at_least and current >= value):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name} never reached {value}; last {current}")


# --- metrics, energy and the performance model -------------------------------------------------


def test_energy_counter_is_modelled_and_grows_with_work(serve):
    url = serve(time_scale=100, max_model_len=4096)
    with httpx.Client(base_url=url, timeout=30) as http:
        text = http.get("/metrics").text
        assert "# HELP idlegrid_sim_energy_joules_total Modeled (not measured)" in text
        assert metric(text, "idlegrid_sim_info", energy_source="modeled", gpu="h100") == 1
        assert metric(text, "idlegrid_sim_max_num_seqs") == 256
        assert metric(text, "vllm:cache_config_info", block_size="16") == 1

        def energy_and_clocks() -> tuple[float, float, float]:
            info = http.get("/v1/sim/info").json()
            return info["energy_j"], info["sim_seconds"], info["busy_seconds"]

        started = time.monotonic()
        e0, t0, _ = energy_and_clocks()
        time.sleep(0.2)
        e1, t1, b1 = energy_and_clocks()
        wall = time.monotonic() - started
        assert 0.2 * 100 * 0.95 < t1 - t0 < wall * 100 * 1.05  # idle time runs at the time scale too
        idle_w = GPUS["h100"].idle_w
        assert (e1 - e0) / (t1 - t0) == pytest.approx(idle_w, rel=0.01)

        http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1500, "ignore_eos": True})
        e2, t2, b2 = energy_and_clocks()
        busy = b2 - b1
        assert busy == pytest.approx(1500 * PerfModel(GPUS["h100"], MODELS[MODEL]).step_seconds(1, 750, 1), rel=0.1)
        busy_watts = (e2 - e1 - idle_w * (t2 - t1 - busy)) / busy
        assert busy_watts == pytest.approx(467, rel=0.05)  # one sequence decoding, as measured on an H100
        assert metric(http.get("/metrics").text, "idlegrid_sim_energy_joules_total") >= e2


def test_performance_model_matches_ml_energy_h100_measurements():
    """DESIGN field notes: ML.ENERGY, H100, vLLM, bf16. Llama-3.1-8B chat at max_num_seqs
    8/64/512: 1,070 / 5,147 / 9,806 output tokens/s and 2.2 / 8.4 / 14.3 tokens/J."""
    perf = PerfModel(GPUS["h100"], LLAMA_3_1_8B)
    for batch, tokens_per_s, tokens_per_j in ((8, 1070, 2.2), (64, 5147, 8.4), (512, 9806, 14.3)):
        context = min(1000, perf.kv_capacity_tokens // batch)
        modelled = perf.decode_tokens_per_s(batch, context)
        assert modelled == pytest.approx(tokens_per_s, rel=0.2), batch
        assert modelled / perf.power_watts(batch) == pytest.approx(tokens_per_j, rel=0.2), batch
    # ML.ENERGY, Qwen3-8B reasoning on GPQA (~7.8k output tokens): 3,117 tokens/s at 4.5 tokens/J.
    # The KV cache limits the batch: about 4k tokens of context per sequence on average.
    qwen3_8b = ModelProfile(
        "qwen3-8b", "Qwen/Qwen3-8B", layers=36, hidden_size=4096, attention_heads=32, kv_heads=8,
        head_dim=128, intermediate_size=12288, vocab_size=151936,
    )
    perf = PerfModel(GPUS["h100"], qwen3_8b)
    batch = perf.kv_capacity_tokens // 4000
    modelled = perf.decode_tokens_per_s(batch, 4000)
    assert modelled == pytest.approx(3117, rel=0.2)
    assert modelled / perf.power_watts(batch) == pytest.approx(4.5, rel=0.2)

    # Faster memory decodes faster; a bigger model decodes slower.
    r1_7b = {gpu: PerfModel(GPUS[gpu], MODELS["deepseek-r1-distill-qwen-7b"]).decode_tokens_per_s(64, 2000) for gpu in ("h100", "h200", "h20", "l40s")}
    assert r1_7b["h200"] > r1_7b["h100"] > r1_7b["h20"] > r1_7b["l40s"]
    assert PerfModel(GPUS["h100"], MODELS["deepseek-r1-distill-qwen-32b"]).decode_tokens_per_s(64, 2000) < r1_7b["h100"] / 3


def test_engine_delivers_the_modelled_throughput(serve):
    """Eight concurrent sequences on a simulated H100: tokens per simulated second of
    work match the roofline, and the wall clock runs about time_scale times faster."""
    scale, batch, tokens = 5, 8, 600
    url = serve(time_scale=scale, max_num_seqs=batch)
    perf = PerfModel(GPUS["h100"], MODELS[MODEL])

    async def run() -> tuple[float, float, str]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            # Hold the requests until all have arrived, so they decode as one batch.
            await http.post("/pause", params={"mode": "keep"})
            requests = [
                asyncio.create_task(http.post("/v1/completions", json={"prompt": f"q{i}", "max_tokens": tokens, "ignore_eos": True}))
                for i in range(batch)
            ]
            await until_held(http, batch)
            before = (await http.get("/v1/sim/info")).json()["busy_seconds"]
            started = time.monotonic()
            await http.post("/resume")
            await asyncio.gather(*requests)
            wall = time.monotonic() - started
            after = (await http.get("/v1/sim/info")).json()["busy_seconds"]
            return after - before, wall, (await http.get("/metrics")).text

    simulated, wall, text = asyncio.run(run())
    assert metric(text, "vllm:generation_tokens_total") == batch * tokens
    expected = perf.decode_tokens_per_s(batch, tokens // 2)
    assert batch * tokens / simulated == pytest.approx(expected, rel=0.1)
    assert simulated * 0.9 < wall * scale < simulated * 5  # never faster than the time scale allows


def test_sixteen_engines_share_one_event_loop():
    engines = [SimEngine(time_scale=100, max_model_len=2048, gpu=gpu) for gpu in ["h100", "h20", "l40s", "a800"] * 4]
    with EnginesInThread(engines) as fleet:
        assert len(set(fleet.urls)) == 16

        async def ask_all() -> list[dict]:
            async with httpx.AsyncClient(timeout=60) as http:
                responses = await asyncio.gather(*(
                    http.post(url + "/v1/chat/completions", json=chat_body(max_tokens=200, ignore_eos=True))
                    for url in fleet.urls for _ in range(4)
                ))
                return [r.json() for r in responses]

        started = time.monotonic()
        results = asyncio.run(ask_all())
        assert all(r["usage"]["completion_tokens"] == 200 for r in results)
        assert time.monotonic() - started < 15


# --- command line ------------------------------------------------------------------------------


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="idlegrid sim-engine")
    sim_cli.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("--gpu", "v100"), "known gpus: h100, h200, h20, a800, l40s, 910b, rtx4090"),
        (("--model", "llama"), "known models: deepseek-r1-distill-qwen-1.5b"),
        (("--gpu", "rtx4090", "--model", "deepseek-r1-distill-qwen-32b"), "does not fit"),
        (("--time-scale", "0"), "--time-scale must be positive"),
    ],
)
def test_cli_rejects_bad_profiles_with_one_line(capsys, argv, expected):
    assert sim_cli.run(_parse(*argv)) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_cli_serves_count_engines_and_stops_on_sigterm():
    code = (
        "import argparse, sys; from workers.sim import cli; p = argparse.ArgumentParser(); "
        "cli.add_arguments(p); sys.exit(cli.run(p.parse_args()))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, "--port", "0", "--count", "2", "--time-scale", "100", "--gpu", "h20"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        banner = process.stdout.readline()
        urls = re.findall(r"http://127\.0\.0\.1:\d+", banner)
        assert len(urls) == 2, banner
        for url in urls:
            reply = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=10).json()
            assert reply["usage"]["completion_tokens"] == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
