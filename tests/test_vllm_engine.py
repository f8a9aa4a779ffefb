"""The parts of vLLM's wire format and lifecycle that idlegrid relies on,
checked against a real vLLM server (CPU build) serving the tiny model.

See docs/engine-contract.md for the captured examples these facts come from.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.tiny_model import THINK_END, build_tiny_model
from tests.vllm_server import vllm_engine, vllm_server  # noqa: F401  (fixtures)
from workers.vllm_launch import vllm_command

pytestmark = pytest.mark.vllm

BOS_ID, EOS_ID, THINK_END_ID = 0, 1, 513
HELLO = [{"role": "user", "content": "Hello!"}]


@pytest.fixture
def client(vllm_engine):
    base_url, api_key, _ = vllm_engine
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60) as c:
        yield c


def iter_sse(response: httpx.Response) -> Iterator[dict | str]:
    """The `data:` payloads of an SSE response, as they arrive: dicts, then "[DONE]"."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            yield payload if payload == "[DONE]" else json.loads(payload)


def sse_events(response: httpx.Response) -> list[dict | str]:
    return list(iter_sse(response))


def stream_chat(client, model, **body) -> list[dict | str]:
    request = {
        "model": model,
        "messages": HELLO,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
        **body,
    }
    with client.stream("POST", "/v1/chat/completions", json=request) as response:
        assert response.status_code == 200
        return sse_events(response)


def generated_ids(events) -> list[int]:
    return [i for e in events if isinstance(e, dict) for c in e["choices"] for i in c.get("token_ids") or []]


def test_streamed_chat_carries_prompt_and_generated_token_ids(client, vllm_engine):
    events = stream_chat(client, vllm_engine.model, max_tokens=300)

    first = events[0]
    assert first["prompt_token_ids"][0] == BOS_ID
    assert "token_ids" not in first["choices"][0]
    assert all("prompt_token_ids" not in e for e in events[1:-1])

    *token_chunks, usage_chunk, done = events[1:]
    assert done == "[DONE]"
    assert usage_chunk["choices"] == []
    assert all(c["token_ids"] for e in token_chunks for c in e["choices"])
    ids = generated_ids(events)
    assert len(ids) == usage_chunk["usage"]["completion_tokens"]
    assert usage_chunk["usage"]["prompt_tokens"] == len(first["prompt_token_ids"])
    assert token_chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert ids[-1] == EOS_ID

    request = {"model": vllm_engine.model, "messages": HELLO, "temperature": 0, "max_tokens": 300}
    whole = client.post("/v1/chat/completions", json={**request, "return_token_ids": True}).json()
    assert whole["choices"][0]["token_ids"] == ids
    assert whole["prompt_token_ids"] == first["prompt_token_ids"]


def test_reasoning_streams_as_delta_reasoning_then_content(client, vllm_engine):
    events = stream_chat(client, vllm_engine.model, max_tokens=300)
    deltas = [c["delta"] for e in events if isinstance(e, dict) for c in e["choices"]]

    reasoning = "".join(d.get("reasoning") or "" for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    assert reasoning.strip() and content.strip()
    assert THINK_END not in reasoning + content
    assert not any("reasoning_content" in d for d in deltas)
    # No content before the end of reasoning, no reasoning after it.
    texts = [d for d in deltas if d.get("reasoning") or d.get("content")]
    kinds = ["reasoning" if d.get("reasoning") else "content" for d in texts]
    assert kinds == sorted(kinds, key=lambda kind: kind == "content")
    # The </think> token arrives with an empty delta, unless the server
    # merged it with neighbouring tokens into one chunk (it does under load).
    choices = [c for e in events if isinstance(e, dict) for c in e["choices"]]
    (think_end,) = [c for c in choices if THINK_END_ID in (c.get("token_ids") or [])]
    if think_end["token_ids"] == [THINK_END_ID]:
        assert think_end["delta"] == {}


def test_greedy_continuation_from_token_ids_is_exact(client, vllm_engine):
    model = vllm_engine.model
    events = stream_chat(client, model, max_tokens=120, ignore_eos=True)
    prompt, ids = events[0]["prompt_token_ids"], generated_ids(events)
    assert THINK_END_ID in ids
    # Resume mid-reasoning and just before </think>, as migration does.
    for k in (17, ids.index(THINK_END_ID) - 1):
        request = {
            "model": model,
            "prompt": prompt + ids[:k],
            "max_tokens": len(ids) - k,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
        with client.stream("POST", "/v1/completions", json=request) as response:
            resumed = sse_events(response)
        assert resumed[0]["choices"][0]["prompt_token_ids"] == prompt + ids[:k]
        assert generated_ids(resumed) == ids[k:]
        # Completions has no reasoning parser: </think> is plain text there.
        text = "".join(c["text"] for e in resumed[:-1] for c in e["choices"])
        assert THINK_END in text


def test_metrics_report_load_and_kv_capacity(client, vllm_engine):
    text = client.get("/metrics").text
    label = f'model_name="{vllm_engine.model}"'
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        samples = re.findall(rf"^{re.escape(name)}{{[^}}]*{re.escape(label)}[^}}]*}} (\S+)$", text, re.M)
        assert samples, name
        assert 0.0 <= float(samples[0]) <= (1.0 if name.endswith("_perc") else 1e9)
    kv_tokens = re.search(r'^vllm:cache_config_info{.*kv_cache_size_tokens="(\d+)"', text, re.M)
    assert kv_tokens and int(kv_tokens.group(1)) > 0


def stream_then_pause(client, model: str, after_events: int = 5) -> list[dict | str]:
    """Stream a long reply and POST /pause?mode=abort after a few events."""
    request = {
        "model": model,
        "messages": HELLO,
        "max_tokens": 1900,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    events: list[dict | str] = []
    with client.stream("POST", "/v1/chat/completions", json=request) as response:
        for event in iter_sse(response):
            events.append(event)
            if len(events) == after_events:
                # Sent from the reading loop: a timer would fire late on a
                # busy machine while chunks pile up unread.
                assert client.post("/pause?mode=abort").json() == {"status": "paused"}
    return events


def test_pause_abort_ends_streams_with_abort_usage_and_done(client, vllm_engine):
    model = vllm_engine.model
    try:
        # On a starved CPU vLLM's API server falls behind its engine and
        # delivers a stream in one burst at the end; then the pause lands
        # after the request has finished. Such a run proves nothing: retry.
        for _ in range(3):
            events = stream_then_pause(client, model)
            finishes = [c["finish_reason"] for e in events[:-2] for c in e["choices"] if c["finish_reason"]]
            assert events[-1] == "[DONE]"
            assert len(generated_ids(events)) == events[-2]["usage"]["completion_tokens"]
            if finishes != ["length"]:
                break
            client.post("/resume")
        assert finishes == ["abort"]
        assert events[-2]["usage"]["completion_tokens"] < 1900
        assert client.get("/is_paused").json() == {"is_paused": True}

        # A request sent while paused waits for /resume instead of failing.
        result: dict = {}
        small = {"model": model, "messages": HELLO, "max_tokens": 3}
        waiting = threading.Thread(
            target=lambda: result.update(client.post("/v1/chat/completions", json=small).json())
        )
        waiting.start()
        waiting.join(timeout=2)
        assert waiting.is_alive(), "a request sent while paused should wait"
    finally:
        client.post("/resume")
    waiting.join(timeout=30)
    assert result["choices"][0]["finish_reason"] == "length"
    assert client.get("/is_paused").json() == {"is_paused": False}


def test_sleep_then_wake_up_serves_again(client, vllm_engine):
    try:
        assert client.post("/sleep?level=1").json() == {"status": "sleeping", "level": 1}
        assert client.get("/is_sleeping").json() == {"is_sleeping": True}
        assert client.get("/health").status_code == 200
    finally:
        assert client.post("/wake_up").json()["status"] == "awake"
    assert client.get("/is_sleeping").json() == {"is_sleeping": False}
    reply = client.post(
        "/v1/chat/completions", json={"model": vllm_engine.model, "messages": HELLO, "max_tokens": 2}
    )
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2


def test_error_shapes(client, vllm_engine):
    unknown = client.post("/v1/chat/completions", json={"model": "nope", "messages": HELLO})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == 404 and "nope" in unknown.json()["error"]["message"]

    negative = {"model": vllm_engine.model, "messages": HELLO, "max_tokens": -1}
    bad = client.post("/v1/chat/completions", json=negative)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"

    anonymous = httpx.post(vllm_engine.base_url + "/v1/models")
    assert anonymous.status_code == 401 and anonymous.json() == {"error": "Unauthorized"}


def test_api_key_is_passed_in_the_environment_not_argv():
    argv, env = vllm_command("/models/m", "127.0.0.1", 8001, "sk-secret", ["--max-model-len", "2048"])
    assert "sk-secret" not in " ".join(argv)
    assert env["VLLM_API_KEY"] == "sk-secret" and env["VLLM_SERVER_DEV_MODE"] == "1"
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[-2:] == ["--max-model-len", "2048"]


def test_tiny_model_is_rebuilt_identically(tmp_path: Path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    first = build_tiny_model(tmp_path / "a")
    second = build_tiny_model(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
