"""Centers: a simulated fleet emulates each center's distance, and an API key
limited to some centers (data residency) is never served anywhere else."""

from __future__ import annotations

import concurrent.futures
import time

import httpx

from tests.conftest import MODEL


def test_residency_is_never_violated_and_distance_is_emulated(gateway_server):
    gw = gateway_server
    gw.start_sim_worker("dc-a", time_scale=1.0, seed=1)
    gw.start_sim_worker("dc-b", time_scale=1.0, seed=1, extra=["--extra-latency-ms", "300"])
    gw.wait_ready(2)
    centers = {w["id"]: w["center"] for w in gw.workers()}
    with gw.admin as admin:
        key_b = admin.post("/admin/keys", json={"name": "eu-only", "allowed_centers": ["dc-b"]}).json()["key"]
        key_a = admin.post("/admin/keys", json={"name": "us-only", "allowed_centers": ["dc-a"]}).json()["key"]

    def ask(key: str) -> tuple[str, float]:
        started = time.monotonic()
        r = httpx.post(gw.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3},
                       headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 200, r.text
        return centers[r.headers["x-idlegrid-worker"]], time.monotonic() - started

    far = [ask(key_b) for _ in range(6)]
    near = [ask(key_a) for _ in range(6)]
    assert {c for c, _ in far} == {"dc-b"}, "an eu-only key is served in dc-b only"
    assert {c for c, _ in near} == {"dc-a"}
    assert min(t for _, t in far) >= 0.3, "dc-b's emulated round trip is felt"
    assert max(t for _, t in near) < min(t for _, t in far)

    # With dc-b's only worker drained, the eu-only key waits and gets 429 or 503: never dc-a.
    b_id = next(i for i, c in centers.items() if c == "dc-b")
    with gw.admin as admin:
        admin.post(f"/admin/workers/{b_id}/drain")
    r = httpx.post(gw.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3},
                   headers={"Authorization": f"Bearer {key_b}"}, timeout=30)
    assert r.status_code in (429, 503), r.text


def test_a_request_leaves_home_only_when_the_wait_there_is_longer_than_the_trip(redis_url):
    """Home (dc-a) has one slot; dc-b is 200 ms away. While home is busy with a long
    answer, the next request crosses to dc-b; while it is busy with a short one, the
    next request waits for it instead."""
    from tests.conftest import start_gateway

    server, gw = start_gateway(redis_url, center="dc-a", center_rtt_ms={"dc-b": 200.0}, queue_timeout_s=30.0)
    try:
        gw.start_sim_worker("dc-a", time_scale=1.0, max_num_seqs=1, seed=1)
        gw.start_sim_worker("dc-b", time_scale=1.0, seed=1, extra=["--extra-latency-ms", "200"])
        gw.wait_ready(2)
        centers = {w["id"]: w["center"] for w in gw.workers()}
        headers = {"Authorization": f"Bearer {gw.api_key}"}

        def where_does_the_next_one_go(first_tokens: int) -> str:
            body = {"model": MODEL, "prompt": "hi", "max_tokens": first_tokens, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", gw.url + "/v1/completions", json=body, headers=headers, timeout=60) as first:
                assert centers[first.headers["x-idlegrid-worker"]] == "dc-a", "room at home: home"
                lines = first.iter_lines()
                next(lines)  # the first answer is under way on the only home slot
                # At ~1.7 ms a token (this model on an H100), a long answer holds home's
                # slot for seconds, a short one for ~100 ms.
                second = httpx.post(gw.url + "/v1/completions", headers=headers, timeout=60,
                                    json={"model": MODEL, "prompt": "hi", "max_tokens": 8, "ignore_eos": True})
                assert second.status_code == 200, second.text
                for _ in lines:
                    pass
            return centers[second.headers["x-idlegrid-worker"]]

        assert where_does_the_next_one_go(1_500) == "dc-b", "seconds of waiting at home > a 200 ms trip"
        assert where_does_the_next_one_go(60) == "dc-a", "a slot freeing within ~100 ms at home beats the trip"

        # A burst of such short requests: home frees a slot every ~100 ms, so the head
        # of the line waits for it, and those with two or more ahead of them (a wait
        # of 300 ms and up) cross to dc-b instead of queueing.
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 60, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", gw.url + "/v1/completions", json=body, headers=headers, timeout=60) as first:
            assert centers[first.headers["x-idlegrid-worker"]] == "dc-a"
            next(first.iter_lines())
            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                answers = list(pool.map(lambda _: httpx.post(
                    gw.url + "/v1/completions", headers=headers, timeout=60,
                    json={"model": MODEL, "prompt": "hi", "max_tokens": 60, "ignore_eos": True}), range(6)))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        followers = [centers[a.headers["x-idlegrid-worker"]] for a in answers]
        assert followers.count("dc-a") >= 1, f"the head of the line waits at home: {followers}"
        assert followers.count("dc-b") >= 2, f"requests far back in line cross: {followers}"
    finally:
        gw.stop_agents()
        server.stop()
