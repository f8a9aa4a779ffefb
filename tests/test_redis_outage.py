"""Redis killed and restarted under load: answers already accepted finish,
requests arriving meanwhile get a quick 503 (never a hang), and service resumes
once Redis is back."""

from __future__ import annotations

import concurrent.futures
import time

import httpx

from gateway.embedded_redis import EmbeddedRedis
from tests.conftest import MODEL, start_gateway


def test_redis_restart_loses_no_accepted_request(tmp_path):
    redis = EmbeddedRedis(tmp_path / "redis").start()
    server, gw = start_gateway(redis.url, queue_timeout_s=5.0)
    try:
        gw.start_sim_worker("dc-a", seed=3, time_scale=1.0)
        gw.start_sim_worker("dc-b", seed=3, time_scale=1.0)
        gw.wait_ready(2)
        body = {"model": MODEL, "prompt": "long answer", "max_tokens": 1500, "ignore_eos": True}
        headers = {"Authorization": f"Bearer {gw.api_key}"}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            accepted = [pool.submit(httpx.post, gw.url + "/v1/completions", json=body, headers=headers, timeout=120) for _ in range(8)]
            deadline = time.monotonic() + 10
            while sum(w["reserved_requests"] for w in gw.workers()) < 8 and time.monotonic() < deadline:
                time.sleep(0.05)
            redis.kill()  # SIGKILL: no goodbye, no final save

            started = time.monotonic()
            r = httpx.post(gw.url + "/v1/completions", json={**body, "max_tokens": 5}, headers=headers, timeout=30)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "redis_unavailable"
            assert time.monotonic() - started < 5, "an outage answers fast, it does not hang"

            time.sleep(1.0)
            redis = EmbeddedRedis(tmp_path / "redis", port=redis.port).start()  # same files, same port
            results = [f.result(timeout=120) for f in accepted]
        assert [r.status_code for r in results] == [200] * 8
        assert [r.json()["usage"]["completion_tokens"] for r in results] == [1500] * 8, "accepted answers finished in full"

        # Service resumes: heartbeats bring the fleet back, new requests are served.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = httpx.post(gw.url + "/v1/completions", json={**body, "max_tokens": 5}, headers=headers, timeout=30)
            if r.status_code == 200:
                break
            time.sleep(0.2)
        assert r.status_code == 200, r.text
        assert len(gw.wait_ready(2, timeout=20)) == 2
        assert all(w["reserved_requests"] == 0 for w in gw.workers())
    finally:
        gw.stop_agents()
        server.stop()
        redis.stop()
