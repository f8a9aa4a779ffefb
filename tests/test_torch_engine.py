"""The torch engine on the CPU: a tiny random-weight Llama behind the simulated
engine's vLLM API, over real HTTP; its tokens are the model's own greedy picks."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import pytest

torch = pytest.importorskip("torch")

from workers.engine_metrics import parse_metrics  # noqa: E402
from workers.sim.tokens import decode  # noqa: E402
from workers.torch_engine.engine import OUTPUT_IDS, TorchEngine  # noqa: E402
from workers.torch_engine.model import CONFIGS, Chunk, ModelRunner  # noqa: E402
from workers.torch_engine.server import EngineInThread  # noqa: E402

from tests.conftest import wait_for  # noqa: E402

MAX_NUM_SEQS = 4
MAX_MODEL_LEN = 2048


@pytest.fixture(scope="module")
def served():
    engine = TorchEngine(model="tiny", device="cpu", max_num_seqs=MAX_NUM_SEQS, max_model_len=MAX_MODEL_LEN)
    with EngineInThread(engine) as served:
        yield served


@pytest.fixture
def http(served):
    with httpx.Client(base_url=served.url, timeout=30) as client:
        yield client


def complete(http: httpx.Client, prompt: str, max_tokens: int = 12, **extra) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "return_token_ids": True, **extra}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def stream_events(http: httpx.Client, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def info(http: httpx.Client) -> dict:
    return http.get("/v1/torch/info").json()


# --- the model ---------------------------------------------------------------------------------


def test_cached_batched_decoding_matches_recomputing_each_sequence_alone():
    runner = ModelRunner(CONFIGS["tiny"], max_num_seqs=3, max_len=64, device="cpu", dtype=torch.float32, seed=3,
                         output_ids=OUTPUT_IDS)
    runner.step([Chunk(1, 0, [151646, 9, 9, 9, 9, 9, 9])])  # slot 1 holds another sequence's keys
    a, b = [151646, 300, 301, 302], [151646, 400]
    a += runner.step([Chunk(0, 0, a)])
    b += runner.step([Chunk(2, 0, b)])
    for _ in range(10):  # decoded as one batch, with slot 1 between them
        pick_a, pick_b = runner.step([Chunk(0, len(a) - 1, a[-1:]), Chunk(2, len(b) - 1, b[-1:])])
        a.append(pick_a)
        b.append(pick_b)
    for sequence in (a, b):  # each whole sequence again, alone, in one pass: the same next token
        assert runner.step([Chunk(1, 0, sequence[:-1])]) == sequence[-1:]
    assert len(set(a[4:])) > 3  # words, not one token over and over


# --- the API -----------------------------------------------------------------------------------


def test_completions_are_the_models_greedy_tokens_and_repeat_exactly(http):
    first = complete(http, "Why is the sky blue?")
    again = complete(http, "Why is the sky blue?")
    other = complete(http, "What is two plus two?")
    choice = first["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["token_ids"]) == 12
    assert set(choice["token_ids"]) <= set(OUTPUT_IDS)
    assert choice["text"] == decode(choice["token_ids"]) and choice["text"].strip()
    assert again["choices"][0]["token_ids"] == choice["token_ids"]
    assert other["choices"][0]["token_ids"] != choice["token_ids"]
    prompt_tokens = len(choice["prompt_token_ids"])
    assert (first["usage"]["prompt_tokens"], first["usage"]["completion_tokens"]) == (prompt_tokens, 12)


def test_streams_carry_the_same_tokens_with_usage(http):
    whole = complete(http, "Tell me about rivers", max_tokens=10)["choices"][0]["token_ids"]
    chunks = stream_events(http, "/v1/completions", {"prompt": "Tell me about rivers", "max_tokens": 10, "ignore_eos": True,
                                                     "return_token_ids": True, "stream_options": {"include_usage": True}})
    assert [t for c in chunks if c["choices"] for t in c["choices"][0]["token_ids"]] == whole
    assert chunks[-1]["usage"]["completion_tokens"] == 10

    chat = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "ignore_eos": True, "return_token_ids": True}
    answer = http.post("/v1/chat/completions", json=chat).json()
    assert answer["usage"]["completion_tokens"] == 8
    events = stream_events(http, "/v1/chat/completions", {**chat, "stream_options": {"include_usage": True}})
    streamed = [t for e in events if e["choices"] for t in (e["choices"][0].get("token_ids") or [])]
    assert streamed == answer["choices"][0]["token_ids"] and events[-1]["usage"]["completion_tokens"] == 8
    message = answer["choices"][0]["message"]
    assert (message["reasoning"] or "") + (message["content"] or "") == decode(streamed)


async def test_a_batch_gives_each_request_the_tokens_it_gets_alone(served, http):
    prompts = ["a", "The quick brown fox jumps over", "Count from one to ten, slowly, then back again"]
    alone = [complete(http, p, max_tokens=24)["choices"][0]["token_ids"] for p in prompts]
    steps_before = info(http)["steps"]
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        replies = await asyncio.gather(*(
            client.post("/v1/completions", json={"prompt": p, "max_tokens": 24, "ignore_eos": True, "return_token_ids": True})
            for p in prompts
        ))
    assert [r.json()["choices"][0]["token_ids"] for r in replies] == alone
    assert info(http)["steps"] - steps_before < 2 * 24  # decoded together, not one after another


def test_metrics_use_vllms_names_and_no_modelled_energy(http):
    complete(http, "x", max_tokens=2)
    text = http.get("/metrics").text
    assert "idlegrid_sim_" not in text and "idlegrid_torch_info{" in text
    metrics = parse_metrics(text)
    assert metrics.energy_j is None and metrics.power_w is None  # the agent reads NVML instead
    assert metrics.kv_capacity_tokens == MAX_NUM_SEQS * MAX_MODEL_LEN
    card = http.get("/v1/models").json()["data"][0]
    assert (card["id"], card["owned_by"], card["max_model_len"]) == ("torch-tiny", "idlegrid-torch", MAX_MODEL_LEN)
    about = info(http)
    assert about["simulated"] is False and about["energy_source"] is None
    assert about["model"]["params"] == CONFIGS["tiny"].params and about["model"]["dtype"] == "float32"


# --- lifecycle ---------------------------------------------------------------------------------


async def test_pause_abort_ends_a_stream_with_its_partial_output(served, http):
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        body = {"prompt": "go on", "max_tokens": 1900, "ignore_eos": True, "return_token_ids": True, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            lines = (line.removeprefix("data: ") async for line in response.aiter_lines() if line)
            received = [await anext(lines) for _ in range(3)]
            assert (await client.post("/pause", params={"mode": "abort"})).json() == {"status": "paused"}
            received += [line async for line in lines]
    assert received[-1] == "[DONE]"
    chunks = [json.loads(line) for line in received[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "abort"
    assert 3 <= sum(len(c["choices"][0]["token_ids"]) for c in chunks) < 1900
    assert http.get("/is_paused").json() == {"is_paused": True}
    assert http.post("/resume").json() == {"status": "resumed"}
    assert complete(http, "after", max_tokens=3)["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("level", [1, 2])
async def test_sleep_frees_the_cache_and_wake_up_brings_the_same_model_back(served, http, level):
    engine = served.engines[0]
    before = complete(http, "Remember me", max_tokens=10)["choices"][0]["token_ids"]
    assert info(http)["kv_cache_bytes"] > 0
    assert http.post("/sleep", params={"level": level}).json() == {"status": "sleeping", "level": level}
    about = info(http)
    assert about["sleep_level"] == level and about["kv_cache_bytes"] == 0 and engine.runner.cache is None
    if level == 1:
        assert about["weights_on"] == "cpu"  # host memory (on a CPU-only machine, where they were)
    else:
        assert about["weights_on"] is None and engine.runner.model is None  # dropped
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        held = asyncio.create_task(client.post("/v1/completions", json={
            "prompt": "Remember me", "max_tokens": 10, "ignore_eos": True, "return_token_ids": True}))
        await asyncio.to_thread(wait_for, lambda: info(http)["held_requests"] == 1, 10, "the request to be held")
        assert not held.done()
        assert (await client.post("/wake_up")).json() == {"status": "awake", "tags": None}
        after = (await held).json()["choices"][0]["token_ids"]
    assert after == before  # the same weights: moved back, or rebuilt from the seed
    assert info(http)["kv_cache_bytes"] > 0 and info(http)["weights_on"] == "cpu"


# --- through a gateway -------------------------------------------------------------------------


def test_a_torch_worker_serves_through_the_gateway(gateway_server, tmp_path):
    log = open(tmp_path / "agent.log", "wb")
    agent = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "worker", "--gateway", gateway_server.url,
         "--token", gateway_server.enroll_token("dc-a"), "--center", "dc-a", "--engine", "torch", "--model", "tiny",
         "--max-num-seqs", "4", "--drain-timeout", "5", "--", "--device", "cpu", "--max-model-len", "512"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    gateway_server.agents.append(agent)
    try:
        [worker] = gateway_server.wait_ready(1, timeout=60)
    except TimeoutError:
        raise AssertionError((tmp_path / "agent.log").read_text()) from None
    assert (worker["model"], worker["engine_kind"], worker["max_num_seqs"]) == ("torch-tiny", "torch", 4)
    assert worker["energy_source"] in (None, "", "nvml")  # never modeled: NVML where there is a GPU
    with gateway_server.client as client:
        reply = client.post("/v1/chat/completions", json={
            "model": "torch-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 5
        models = client.get("/v1/models").json()["data"]
        assert models[0]["id"] == "torch-tiny" and models[0]["owned_by"] == "idlegrid"  # not simulated
