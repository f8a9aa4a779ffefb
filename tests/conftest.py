"""Shared fixtures: real Redis servers, a real gateway on loopback, real worker
agents (subprocesses running `idlegrid worker`) with simulated engines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.embedded_redis import EmbeddedRedis, free_port
from tests.vllm_server import vllm_engine, vllm_server  # noqa: F401  (real vLLM fixtures)

MODEL = "deepseek-r1-distill-qwen-1.5b"


@pytest.fixture
def redis_server(tmp_path):
    """A private, real redis-server for one test."""
    server = EmbeddedRedis(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    return redis_server.url


def wait_for(check, timeout: float, what: str):
    """Poll `check` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class ServerThread:
    """A uvicorn server for an ASGI app, on a free loopback port, in a thread."""

    def __init__(self, app, port: int | None = None):
        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@dataclass
class GatewayHandle:
    url: str
    admin_token: str
    api_key: str
    redis_url: str
    config: GatewayConfig
    agents: list[subprocess.Popen] = field(default_factory=list)

    @property
    def admin(self) -> httpx.Client:
        # Generous: with real vLLM on 2 cores the in-process gateway can answer late.
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.admin_token}"}, timeout=30)

    @property
    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=60)

    def enroll_token(self, center: str = "", uses: int = 1, ttl_s: float = 600) -> str:
        with self.admin as c:
            r = c.post("/admin/enroll-tokens", json={"center": center, "uses": uses, "ttl_s": ttl_s})
            r.raise_for_status()
            return r.json()["token"]

    def workers(self) -> list[dict]:
        with self.admin as c:
            return c.get("/admin/workers").json()["workers"]

    def start_sim_worker(self, center: str = "dc-a", *, gpu: str = "h100", model: str = MODEL, seed: int = 0,
                         time_scale: float = 20.0, max_num_seqs: int | None = None, extra: list[str] = ()) -> subprocess.Popen:
        """`idlegrid worker --engine sim` as a real subprocess; the agent launches the engine."""
        cmd = [sys.executable, "-m", "gateway.cli", "worker", "--gateway", self.url, "--token", self.enroll_token(center),
               "--center", center, "--engine", "sim", "--gpu", gpu, "--model", model, "--seed", str(seed),
               "--time-scale", str(time_scale), "--drain-timeout", "5", *extra]
        if max_num_seqs:
            cmd += ["--max-num-seqs", str(max_num_seqs)]
        agent = subprocess.Popen(cmd, start_new_session=True)
        self.agents.append(agent)
        return agent

    def wait_ready(self, n: int, timeout: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = [w for w in self.workers() if w["state"] == "ready"]
            if len(ready) >= n:
                return ready
            time.sleep(0.1)
        raise TimeoutError(f"{n} workers not ready in {timeout}s: {self.workers()}")

    def stop_agents(self) -> None:
        for agent in self.agents:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
        for agent in self.agents:
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()


def start_gateway(redis_url: str, **overrides) -> tuple[ServerThread, GatewayHandle]:
    from gateway.registry import add_api_key_now

    config = GatewayConfig(redis_url=redis_url, admin_token="test-admin-token", **overrides)
    api_key = "sk-test-key"
    add_api_key_now(redis_url, api_key, "test")
    server = ServerThread(create_app(config)).start()
    return server, GatewayHandle(server.url, config.admin_token, api_key, redis_url, config)


@pytest.fixture
def gateway_server(redis_url):
    """A real gateway on loopback over a real Redis, with no workers yet."""
    server, handle = start_gateway(redis_url, queue_timeout_s=2.0)
    yield handle
    handle.stop_agents()
    server.stop()


@pytest.fixture(scope="module")
def sim_fleet(tmp_path_factory):
    """A gateway with two simulated workers in two centers, shared by a module."""
    redis = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    server, handle = start_gateway(redis.url, queue_timeout_s=2.0)
    # Real-time engines: a long stream stays open while a test looks at it.
    handle.start_sim_worker("dc-a", seed=1, time_scale=1.0)
    handle.start_sim_worker("dc-b", seed=1, time_scale=1.0)
    handle.wait_ready(2)
    yield handle
    handle.stop_agents()
    server.stop()
    redis.stop()
