"""`idlegrid worker` end to end: a real gateway over a real Redis, and the agent
as a subprocess launching a simulated engine of its own."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for

from gateway.cli import main as idlegrid
from gateway.embedded_redis import free_port

MODEL = "deepseek-r1-distill-qwen-1.5b"


def start_agent(gateway_url: str, token: str, log: Path, *, center: str = "dc-a", time_scale: float = 20.0,
                extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gateway.cli", "worker", "--gateway", gateway_url, "--token", token,
           "--center", center, "--engine", "sim", "--gpu", "h100", "--model", MODEL,
           "--time-scale", str(time_scale), "--drain-timeout", "20", *extra]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)



def engine_pid(log: Path) -> int:
    """The engine's pid, from the agent's own log line."""
    found = wait_for(lambda: re.search(r"engine started: pid (\d+)", log.read_text()), 20, "the engine to start")
    return int(found.group(1))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def one_worker(gw, state: str | None = None) -> dict | None:
    workers = gw.workers()
    matching = [w for w in workers if state is None or w["state"] == state]
    return matching[0] if len(workers) == 1 and matching else None


def test_worker_enrolls_reports_load_and_drains_on_sigterm_without_handover(gateway_server, tmp_path):
    gw = gateway_server
    log = tmp_path / "agent.log"
    # --no-handover: wait for in-flight requests (handing them over is tested in test_reclaim.py).
    agent = start_agent(gw.url, gw.enroll_token("dc-a"), log, time_scale=1.0, extra=("--no-handover",))
    gw.agents.append(agent)  # the fixture stops it if the test fails first
    pid = engine_pid(log)

    worker = wait_for(lambda: one_worker(gw, "ready"), 30, "the worker to be ready")
    assert (worker["center"], worker["gpu"], worker["model"]) == ("dc-a", "h100", MODEL)
    assert worker["engine_kind"] == "sim" and worker["engine_pid"] == pid
    assert worker["kv_capacity_tokens"] > 0 and worker["max_num_seqs"] > 0 and worker["tpot_base_ms"] > 0
    assert worker["energy_source"] == "modeled" and worker["power_w"] > 0

    # The engine answers only callers holding the key the agent gave the gateway.
    assert httpx.get(f"{worker['engine_url']}/v1/models").status_code == 401

    # One streamed request long enough (~8 s) to watch the load and the drain.
    max_tokens = int(8000 / worker["tpot_base_ms"])
    stream_result: dict = {}

    def stream() -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "count"}], "stream": True,
                "max_tokens": max_tokens, "ignore_eos": True}
        with gw.client as client, client.stream("POST", "/v1/chat/completions", json=body) as response:
            stream_result["status"] = response.status_code
            stream_result["lines"] = [line for line in response.iter_lines() if line]

    streamer = threading.Thread(target=stream)
    streamer.start()

    busy = wait_for(lambda: (w := one_worker(gw)) and w["running"] >= 1 and w, 10, "the heartbeat to report the request")
    energy_before = busy["energy_j"]
    later = wait_for(lambda: (w := one_worker(gw)) and w["last_heartbeat"] > busy["last_heartbeat"] + 0.5 and w,
                     5, "another heartbeat")
    assert later["energy_j"] > energy_before  # the modelled energy counter keeps running

    agent.send_signal(signal.SIGTERM)
    wait_for(lambda: one_worker(gw, "draining"), 5, "the worker to report draining")
    # While draining, the gateway sends it no new work.
    with gw.client as client:
        refused = client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 4,
                                                            "messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code in (429, 503)
    assert streamer.is_alive(), "the request should still be running while the worker drains"

    # The request in flight finishes in full; then the agent deregisters and exits 0.
    streamer.join(30)
    assert stream_result["status"] == 200
    assert stream_result["lines"][-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in "".join(stream_result["lines"]).replace(" ", "")
    assert agent.wait(20) == 0
    assert gw.workers() == []
    assert not alive(pid), "the engine process must not outlive its agent"
    text = log.read_text()
    for event in ("engine up", "enrolled as worker", "draining", "drained", "deregistered"):
        assert event in text
    assert not re.search(r"eng-[\w-]{20}", text), "the engine's API key must not be logged"


def test_bad_token_exits_with_a_clear_line_and_leaves_no_engine(gateway_server, tmp_path):
    log = tmp_path / "agent.log"
    agent = start_agent(gateway_server.url, "enr-not-a-real-token", log)
    gateway_server.agents.append(agent)
    pid = engine_pid(log)
    assert agent.wait(30) == 1
    text = log.read_text()
    assert "enrollment refused" in text and "enrollment token is not valid" in text
    assert "Traceback" not in text
    assert not alive(pid)
    assert gateway_server.workers() == []


def test_operator_drain_wake_and_revoke(gateway_server, tmp_path):
    gw = gateway_server
    log = tmp_path / "agent.log"
    agent = start_agent(gw.url, gw.enroll_token("dc-a"), log)
    gw.agents.append(agent)
    pid = engine_pid(log)
    worker_id = wait_for(lambda: one_worker(gw, "ready"), 30, "the worker to be ready")["id"]

    with gw.admin as admin:
        assert admin.post(f"/admin/workers/{worker_id}/drain").status_code == 200
        # A drained worker yields its GPU: the engine sleeps, the agent and engine stay up.
        wait_for(lambda: one_worker(gw, "sleeping"), 10, "the worker to drain and sleep")
        assert agent.poll() is None and alive(pid)

        assert admin.post(f"/admin/workers/{worker_id}/wake").status_code == 200
        wait_for(lambda: one_worker(gw, "ready"), 5, "the worker to be ready again")

        assert admin.post(f"/admin/workers/{worker_id}/revoke").status_code == 200
    assert agent.wait(10) == 1
    assert "was revoked" in log.read_text()
    assert not alive(pid)


def _create_enroll_token(redis_url: str, center: str) -> str:
    import redis.asyncio as aioredis

    from gateway.registry import Registry

    async def create() -> str:
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await Registry(client).create_enroll_token(center=center)
        finally:
            await client.aclose()

    return asyncio.run(create())


def start_gateway_process(redis_url: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gateway.cli", "gateway", "--redis", redis_url, "--port", str(port),
           "--admin-token", "adm"]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: _answers(f"http://127.0.0.1:{port}/health"), 30, "the gateway to start")
    return process


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _workers(port: int) -> list[dict]:
    response = httpx.get(f"http://127.0.0.1:{port}/admin/workers", headers={"Authorization": "Bearer adm"})
    return response.json()["workers"]


def test_gateway_outage_keeps_the_engine_running(redis_url, tmp_path):
    port = free_port()
    log = tmp_path / "agent.log"
    agent = start_agent(f"http://127.0.0.1:{port}", _create_enroll_token(redis_url, "dc-a"), log)
    gateway = None
    try:
        pid = engine_pid(log)
        # No gateway yet: the agent keeps retrying and keeps its engine.
        wait_for(lambda: "cannot enroll" in log.read_text(), 20, "the agent to report the gateway unreachable")
        assert agent.poll() is None and alive(pid)

        gateway = start_gateway_process(redis_url, port)
        wait_for(lambda: [w for w in _workers(port) if w["state"] == "ready"], 20, "the worker to enroll")

        gateway.terminate()
        gateway.wait(10)
        wait_for(lambda: "unreachable" in log.read_text().split("enrolled as worker")[-1], 10,
                 "the agent to notice the outage")
        assert agent.poll() is None and alive(pid)

        gateway = start_gateway_process(redis_url, port)
        wait_for(lambda: "reachable again" in log.read_text(), 20, "the agent to reconnect")
        wait_for(lambda: [w for w in _workers(port) if w["state"] == "ready"], 5, "the worker to be ready again")

        agent.send_signal(signal.SIGTERM)
        assert agent.wait(20) == 0
        assert not alive(pid)
        assert _workers(port) == []
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
        if gateway is not None and gateway.poll() is None:
            gateway.terminate()
            gateway.wait(10)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--center", "c"], "give exactly one of --engine"),
        (["--center", "c", "--engine", "sim", "--model", MODEL], "--engine sim needs --gpu"),
        (["--center", "c", "--engine-url", "http://127.0.0.1:9", "--", "--dtype", "half"], "only apply to --engine vllm"),
        (["--center", "c", "--engine", "sim", "--gpu", "h100", "--model", MODEL, "--heartbeat-interval", "5"],
         "--heartbeat-interval must be"),
        (["--center", "c", "--engine-url", "http://127.0.0.1:9", "--on-reclaim", "stop"], "--on-reclaim stop needs an engine"),
        (["--center", "c", "--engine-url", "http://127.0.0.1:9", "--reclaim-nvml"], "--reclaim-nvml needs an engine"),
    ],
)
def test_bad_flags_give_one_line_and_a_nonzero_exit(flags, message, capsys):
    status = idlegrid(["worker", "--gateway", "http://127.0.0.1:9", "--token", "t", *flags])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.fixture
def slow_heartbeat_gateway(redis_url):
    """A gateway that forgives late heartbeats: a vLLM CPU server beside another one
    (the session's) takes both cores of a 2-core CI machine, and its agent's heartbeat
    (which scrapes vLLM's /metrics first) can then be seconds late."""
    from tests.conftest import start_gateway

    server, handle = start_gateway(redis_url, queue_timeout_s=2.0, heartbeat_ttl_s=15.0)
    yield handle
    handle.stop_agents()
    server.stop()


@pytest.mark.vllm
def test_worker_launches_real_vllm_and_reports_its_load(slow_heartbeat_gateway, tmp_path):
    """`idlegrid worker --engine vllm` on the CPU build of vLLM serving the tiny model."""
    from tests.tiny_model import tiny_model_path
    from tests.vllm_server import START_TIMEOUT_S, TEST_ENGINE_ENV, TINY_MODEL_NAME
    from workers.vllm_launch import vllm_missing_reason

    if reason := vllm_missing_reason():
        pytest.skip(reason)
    gw = slow_heartbeat_gateway
    log = tmp_path / "agent.log"
    cmd = [sys.executable, "-m", "gateway.cli", "worker", "--gateway", gw.url, "--token", gw.enroll_token("dc-a"),
           "--center", "dc-a", "--engine", "vllm", "--model", str(tiny_model_path()), "--max-num-seqs", "4",
           "--drain-timeout", "20", "--",
           "--served-model-name", TINY_MODEL_NAME, "--max-model-len", "2048", "--dtype", "float32", "--enforce-eager"]
    with open(log, "wb") as out:
        agent = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, **TEST_ENGINE_ENV})
    gw.agents.append(agent)
    pid = engine_pid(log)

    try:
        worker = wait_for(lambda: agent.poll() is None and one_worker(gw, "ready"), START_TIMEOUT_S + 30, "enrollment")
    except AssertionError:
        raise AssertionError(f"vLLM did not start and enroll (agent exit {agent.poll()}):\n{log.read_text()[-3000:]}") from None
    assert (worker["model"], worker["engine_kind"], worker["engine_pid"]) == (TINY_MODEL_NAME, "vllm", pid)
    assert worker["max_num_seqs"] == 4
    assert worker["kv_capacity_tokens"] > 0  # num_gpu_blocks × block_size from vllm:cache_config_info
    assert worker["energy_source"] is None and worker["energy_j"] is None  # no GPU here: unknown, not invented
    # Only holders of the engine key (the gateways) may call it.
    assert httpx.get(f"{worker['engine_url']}/v1/models").status_code == 401

    # Streams one after another until a heartbeat (every second) has seen one running:
    # on an idle machine one answer can finish between two heartbeats.
    body = {"model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": "count"}], "stream": True,
            "max_tokens": 1800, "ignore_eos": True, "stream_options": {"include_usage": True}}
    results: list[tuple[int, list[str]]] = []
    seen_running = threading.Event()

    def stream_until_seen() -> None:
        with gw.client as client:
            give_up = time.monotonic() + 100
            while True:  # at least one answer, whatever the heartbeats say
                with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    results.append((response.status_code, [line for line in response.iter_lines() if line]))
                if seen_running.is_set() or time.monotonic() > give_up:
                    return

    # The gateway's qualifying request may still show as running in a heartbeat sent just
    # before enrollment finished: start from an idle report, so the 1 below is ours.
    wait_for(lambda: (w := one_worker(gw)) and w["running"] == 0, 10, "the worker to report vLLM idle after qualifying")

    streamer = threading.Thread(target=stream_until_seen)
    streamer.start()
    try:
        try:
            wait_for(lambda: (w := one_worker(gw)) and w["running"] == 1, 100, "the worker to report vLLM's running request")
        except AssertionError as exc:
            seen = [(status, len(lines), lines[-1][:200] if lines else "") for status, lines in results]
            raise AssertionError(f"{exc}; answers so far (status, lines, last line): {seen}; worker: {one_worker(gw)}") from None
    finally:
        seen_running.set()
        streamer.join(120)
    status, lines = results[-1]
    assert status == 200 and lines[-1] == "data: [DONE]"
    assert '"completion_tokens":1800' in "".join(lines).replace(" ", "")
    wait_for(lambda: (w := one_worker(gw)) and w["running"] == 0, 10, "the worker to report vLLM idle again")

    agent.send_signal(signal.SIGTERM)
    assert agent.wait(60) == 0
    assert gw.workers() == []
    # vLLM's engine-core child went with it: nothing is left in the engine's process group.
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
