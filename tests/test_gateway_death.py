"""A gateway process that dies loses only its own clients' connections: streams
through the other gateways finish, and the fleet keeps serving."""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import sys
import time

import httpx

from gateway.embedded_redis import free_port
from tests.conftest import MODEL, start_gateway


def test_killed_gateway_loses_only_its_own_streams(redis_url):
    server, gw = start_gateway(redis_url, queue_timeout_s=10.0)
    port = free_port()
    doomed = subprocess.Popen([sys.executable, "-m", "gateway.cli", "--log-level", "WARNING", "gateway", "--redis", redis_url, "--port", str(port), "--admin-token", gw.admin_token])
    doomed_url = f"http://127.0.0.1:{port}"
    try:
        gw.start_sim_worker("dc-a", seed=5, time_scale=1.0)
        gw.start_sim_worker("dc-a", seed=5, time_scale=1.0)
        gw.wait_ready(2)
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(doomed_url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        body = {"model": MODEL, "prompt": "go", "max_tokens": 1500, "ignore_eos": True}
        headers = {"Authorization": f"Bearer {gw.api_key}"}

        def call(url: str):
            try:
                return httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60)
            except httpx.HTTPError as exc:
                return exc

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            survivors = [pool.submit(call, gw.url) for _ in range(4)]
            victims = [pool.submit(call, doomed_url) for _ in range(4)]
            deadline = time.monotonic() + 10
            while sum(w["reserved_requests"] for w in gw.workers()) < 8 and time.monotonic() < deadline:
                time.sleep(0.05)
            doomed.send_signal(signal.SIGKILL)
            doomed.wait(10)
            survived = [f.result(timeout=60) for f in survivors]
            lost = [f.result(timeout=60) for f in victims]
        assert all(isinstance(r, httpx.HTTPError) for r in lost), "the dead gateway's own clients see their connection drop"
        assert [r.status_code for r in survived] == [200] * 4
        assert all(r.json()["usage"]["completion_tokens"] == 1500 for r in survived)
        r = httpx.post(gw.url + "/v1/completions", json={**body, "max_tokens": 5}, headers=headers, timeout=30)
        assert r.status_code == 200, "the fleet keeps serving through the surviving gateway"
    finally:
        if doomed.poll() is None:
            doomed.kill()
        gw.stop_agents()
        server.stop()
