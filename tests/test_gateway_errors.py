"""Bad input and bad fleets get OpenAI-shaped errors with the right status,
never a traceback or a hang. These need no engine at all."""

from __future__ import annotations

import json

import httpx
import pytest

from gateway.embedded_redis import free_port

CHAT = {"model": "deepseek-r1-distill-qwen-1.5b", "messages": [{"role": "user", "content": "hi"}]}


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param
    return err


def test_missing_and_wrong_api_key_are_401(gateway_server):
    r = httpx.post(gateway_server.url + "/v1/chat/completions", json=CHAT)
    assert_openai_error(r, 401)
    r = httpx.post(gateway_server.url + "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-wrong"})
    err = assert_openai_error(r, 401)
    assert err["type"] == "authentication_error"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "m"}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "max_tokens": -5}, "max_tokens"),
        ({**CHAT, "temperature": -0.1}, "temperature"),
        ({**CHAT, "temperature": "hot"}, "temperature"),
        ({**CHAT, "top_p": 1.5}, "top_p"),
        ({**CHAT, "stream": "yes"}, "stream"),
        ({**CHAT, "messages": []}, "messages"),
        ({**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({**CHAT, "n": 0}, "n"),
        ({**CHAT, "messages": [{"content": "hi"}]}, "messages.0.role"),
        ({**CHAT, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ],
)
def test_invalid_fields_are_400_naming_the_field(gateway_server, body, param):
    with gateway_server.client as c:
        r = c.post("/v1/chat/completions", json=body)
    err = assert_openai_error(r, 400, param)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "prompt, param",
    [(5, "prompt"), ([True], "prompt.0"), ([[1, "two"]], "prompt.0.1"), (None, "prompt")],
)
def test_a_prompt_that_is_not_text_or_token_ids_is_400_naming_it(gateway_server, prompt, param):
    with gateway_server.client as c:
        r = c.post("/v1/completions", json={"model": "m", "prompt": prompt})
    assert_openai_error(r, 400, param)


def test_malformed_json_and_non_object_are_400(gateway_server):
    with gateway_server.client as c:
        assert_openai_error(c.post("/v1/chat/completions", content=b'{"model": "m", "messages": [', headers={"content-type": "application/json"}), 400)
        assert_openai_error(c.post("/v1/completions", content=b"[1, 2, 3]"), 400)
        assert_openai_error(c.post("/v1/completions", json={"model": "m"}), 400, "prompt")


def test_body_too_large_is_413(gateway_server):
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (gateway_server.config.max_body_bytes + 10)}]}
    with gateway_server.client as c:
        assert_openai_error(c.post("/v1/chat/completions", json=big), 413)


def test_no_worker_is_503_and_not_ready(gateway_server):
    with gateway_server.client as c:
        assert_openai_error(c.post("/v1/chat/completions", json=CHAT), 503)
        assert c.get("/health").status_code == 200
        assert c.get("/ready").status_code == 503
        assert c.get("/v1/models").json()["data"] == []


def test_unknown_route_is_openai_shaped_404(gateway_server):
    with gateway_server.client as c:
        assert_openai_error(c.get("/v1/nothing-here"), 404)


def _enroll_dead_worker(gateway_server, model: str) -> str:
    """A worker whose engine URL points at a closed port: enrolled and heartbeating
    through the real control API, but its engine never answers."""
    token = gateway_server.enroll_token("dc-a")
    r = httpx.post(gateway_server.url + "/control/enroll", json={
        "token": token, "center": "dc-a", "model": model, "engine_url": f"http://127.0.0.1:{free_port()}",
        "gpu": "h100", "engine_kind": "external",
    })
    r.raise_for_status()
    credential = r.json()["credential"]
    r = httpx.post(gateway_server.url + "/control/heartbeat", json={"state": "ready"}, headers={"Authorization": f"Bearer {credential}"})
    r.raise_for_status()
    return credential


@pytest.fixture
def unprobed_gateway(redis_url):
    """A gateway that trusts workers without qualifying them, so a worker whose
    engine is down can be ready, as happens when an engine dies after joining."""
    from tests.conftest import start_gateway

    server, handle = start_gateway(redis_url, queue_timeout_s=2.0, qualify=False)
    yield handle
    server.stop()


def test_unknown_model_is_404_and_dead_engine_is_502(unprobed_gateway):
    gateway_server = unprobed_gateway
    _enroll_dead_worker(gateway_server, "deepseek-r1-distill-qwen-1.5b")
    with gateway_server.client as c:
        err = assert_openai_error(c.post("/v1/chat/completions", json={**CHAT, "model": "gpt-nope"}), 404, "model")
        assert "gpt-nope" in err["message"]
        # The only worker's engine is down: a 502 after trying, not a hang.
        r = c.post("/v1/chat/completions", json=CHAT)
        assert_openai_error(r, 502)
        assert r.headers["x-request-id"]
        metrics = c.get("/metrics").text
    assert 'idlegrid_requests_total{route="chat",status="502"} 1.0' in metrics


def test_request_id_is_echoed(gateway_server):
    with gateway_server.client as c:
        r = c.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "trace-abc-123"})
    assert r.headers["x-request-id"] == "trace-abc-123"
