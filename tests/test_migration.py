"""A borrowed GPU vanishing mid-answer costs the client nothing: the gateway
resumes every broken stream on another worker from prompt + tokens already sent,
and the client sees one stream, byte-identical to an uninterrupted run."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time

import httpx
import pytest

from tests.conftest import start_gateway

STREAMS = 16
MAX_TOKENS = 1000
# A 7B model decodes slowly enough (simulated, real time) that streams are
# still running on the engine when it dies, not just draining buffers.
MODEL = "deepseek-r1-distill-qwen-7b"


def body(i: int) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Question {i}: prove that there are infinitely many primes."}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,  # every answer runs its full length, so the kill lands mid-stream
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def run_stream(url: str, api_key: str, i: int, progress: dict | None = None) -> dict:
    """One streamed chat answer, as a client sees it."""
    reasoning, content, ids, usage, finish, errors = [], [], set(), None, None, []
    with httpx.Client(timeout=120) as c, c.stream("POST", url + "/v1/chat/completions", json=body(i), headers={"Authorization": f"Bearer {api_key}"}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                errors.append(chunk["error"])
                continue
            ids.add(chunk["id"])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                reasoning.append(choice["delta"].get("reasoning_content") or "")
                content.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
            if progress is not None:
                progress[i] = progress.get(i, 0) + 1
    return {"reasoning": "".join(reasoning), "content": "".join(content), "ids": ids, "usage": usage, "finish": finish, "errors": errors}


@pytest.fixture
def seeded_fleet(redis_url):
    """Three workers with the same seed: any of them continues any answer exactly."""
    server, gw = start_gateway(redis_url, queue_timeout_s=10.0)
    for center in ("dc-a", "dc-a", "dc-b"):
        gw.start_sim_worker(center, model=MODEL, seed=7, time_scale=1.0)
    gw.wait_ready(3)
    yield gw
    gw.stop_agents()
    server.stop()


def run_all(gw, progress=None) -> list[dict]:
    with concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
        futures = [pool.submit(run_stream, gw.url, gw.api_key, i, progress) for i in range(STREAMS)]
        return [f.result() for f in futures]


def test_sigkilled_worker_loses_no_token(seeded_fleet):
    gw = seeded_fleet
    reference = run_all(gw)
    assert all(r["usage"]["completion_tokens"] == MAX_TOKENS for r in reference)

    progress: dict[int, int] = {}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        run = pool.submit(run_all, gw, progress)
        # Wait until every stream is well under way, then kill the busiest worker's engine.
        deadline = time.monotonic() + 30
        while (len(progress) < STREAMS or min(progress.values()) < 200) and time.monotonic() < deadline:
            time.sleep(0.02)
        victim = max(gw.workers(), key=lambda w: w["reserved_requests"])
        assert victim["reserved_requests"] > 0
        os.kill(victim["engine_pid"], signal.SIGKILL)
        interrupted = run.result(timeout=120)

    for ref, got in zip(reference, interrupted):
        assert got["errors"] == []
        assert len(got["ids"]) == 1, "one stream id from start to end"
        assert got["reasoning"] == ref["reasoning"], "reasoning identical to the uninterrupted run"
        assert got["content"] == ref["content"], "answer identical to the uninterrupted run"
        assert got["usage"]["completion_tokens"] == ref["usage"]["completion_tokens"]
        assert got["finish"] == ref["finish"]
    metrics = httpx.get(gw.url + "/metrics").text
    migrated = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("idlegrid_migrations_total"))
    assert migrated >= 1, "some streams really were resumed elsewhere"
    assert victim["id"] not in {w["id"] for w in gw.workers() if w["state"] == "ready"}
