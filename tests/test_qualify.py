"""Qualification on joining: the gateway probes a new worker's engine before it
gets traffic, stores what it measured, and keeps out (flags) a worker that does
not answer or is far slower than the GPU it declared, until an operator clears it.

Real gateways over a real Redis; real simulated engines on loopback, reached
either by a real `idlegrid worker` agent or by raw control-API calls that let a
test declare a speed the engine does not have."""

from __future__ import annotations

import concurrent.futures
import contextlib
import re
import subprocess
import sys
import threading
import time

import httpx
import pytest

from gateway.embedded_redis import free_port
from gateway.qualify import fit_speed
from tests.conftest import MODEL, start_gateway
from tests.test_enrollment import admin_cli, assert_refused
from workers.sim.profiles import PerfModel, get_gpu, get_model

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
ENGINE_KEY = "eng-test-key"
PROBE_REQUESTS = 1 + 2 * (1 + 4 + 8)  # the default probe: a warm-up, then two runs of batches 1, 4, 8


class RawWorker:
    """A worker as the control API sees it, driven by the test: it enrolls with
    whatever it chooses to declare and heartbeats `ready` from a thread."""

    def __init__(self, gateway_url: str, token: str, engine_url: str, **declared):
        r = httpx.post(gateway_url + "/control/enroll", json={
            "token": token, "center": "dc-a", "model": MODEL, "engine_url": engine_url, "gpu": "h100",
            "engine_kind": "sim", "engine_api_key": ENGINE_KEY, **declared,
        })
        assert r.status_code == 200, r.text
        self.id, self.credential = r.json()["worker_id"], r.json()["credential"]
        self.gateway_url = gateway_url
        self.replies: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat_forever, daemon=True)

    def beat(self, gateway_url: str | None = None) -> str:
        r = httpx.post((gateway_url or self.gateway_url) + "/control/heartbeat", json={"state": "ready"},
                       headers={"Authorization": f"Bearer {self.credential}"}, timeout=10)
        assert r.status_code == 200, r.text
        self.replies.append(r.json()["state"])
        return r.json()["state"]

    def _beat_forever(self) -> None:
        while not self._stop.wait(0.3):
            self.beat()

    def __enter__(self) -> RawWorker:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


@contextlib.contextmanager
def running_sim_engine(gpu: str, model: str = MODEL):
    """A real simulated engine in real time (time scale 1), with an API key, in a
    process of its own as a worker agent would run it: (URL, its /v1/sim/info)."""
    port = free_port()
    engine = subprocess.Popen([sys.executable, "-m", "gateway.cli", "sim-engine", "--port", str(port), "--gpu", gpu,
                               "--model", model, "--time-scale", "1", "--max-model-len", "4096", "--api-key", ENGINE_KEY],
                              stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                info = httpx.get(url + "/v1/sim/info", headers={"Authorization": f"Bearer {ENGINE_KEY}"})
                break
            except httpx.TransportError:
                assert engine.poll() is None and time.monotonic() < deadline, "sim engine did not start"
                time.sleep(0.05)
        yield url, info.json()
    finally:
        engine.terminate()
        engine.wait(10)


@pytest.fixture(scope="module")
def sim_engine():
    """Shared by the module's tests; they count the engine's requests as differences."""
    with running_sim_engine("h100") as engine:  # 1.7 ms per token
        yield engine


@pytest.fixture
def slow_sim_engine():
    with running_sim_engine("l40s") as engine:  # 6 ms per token: easy to time even on a busy host
        yield engine


def finished_requests(engine_url: str) -> int:
    text = httpx.get(engine_url + "/metrics").text
    return int(sum(float(v) for v in re.findall(r'^vllm:request_success_total\{[^}]*\} (\S+)', text, re.M)))


def wait_for_worker(gw, worker_id: str, done, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker = next((w for w in gw.workers() if w["id"] == worker_id), None)
        if worker is not None and done(worker):
            return worker
        time.sleep(0.05)
    raise TimeoutError(f"worker {worker_id} not as expected in {timeout}s: {gw.workers()}")


def test_worker_is_ready_only_after_qualification(gateway_server):
    gw = gateway_server
    agent = gw.start_sim_worker("dc-a", time_scale=20.0)
    # Watch the record from enrollment on: it must never be ready without a passed probe.
    seen: list[dict] = []
    deadline = time.monotonic() + 30
    while not any(w["state"] == "ready" for w in seen[-1:]):
        assert agent.poll() is None and time.monotonic() < deadline, seen[-1:]
        seen += gw.workers()
    assert any(w["state"] == "starting" for w in seen)
    assert all(w["qualification"] and w["qualification"]["status"] == "passed" for w in seen if w["state"] == "ready")

    worker = seen[-1]
    q = worker["qualification"]
    assert [b["batch"] for b in q["batches"]] == [1, 4, 8]
    for b in q["batches"]:
        # (At time scale 20 a whole answer can arrive in one read, so TPOT may round to 0.)
        assert b["ttft_ms"] > 0 and b["tpot_ms"] >= 0 and b["tokens_per_s"] > 0
    assert q["tokens_per_s"] == max(b["tokens_per_s"] for b in q["batches"])
    assert q["probe_s"] < 2.0  # short: a joining worker waits on it
    # The measured TPOT feeds the scheduler; the simulator's declared profile is kept.
    assert worker["tpot_ms"] == q["tpot_ms"]
    assert worker["tpot_base_ms"] == q["declared_tpot_base_ms"] > 0
    assert worker["tpot_ms_per_seq"] == round(PerfModel(get_gpu("h100"), get_model(MODEL)).tpot_ms_per_seq, 5)
    assert not worker["flagged"] and worker["qualified"] and q["slowdown"] < 3
    with gw.client as c:
        r = c.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text


def test_an_engine_slowed_below_real_time_is_judged_in_simulated_time(gateway_server):
    """A simulated engine at a quarter of real speed (as benchmarks run them) decodes 4x
    slower by the wall clock than its GPU profile says, and exactly as fast in simulated
    time: it qualifies."""
    gw = gateway_server
    gw.start_sim_worker("dc-a", time_scale=0.25)
    gw.wait_ready(1)
    q = gw.workers()[0]["qualification"]
    assert q["status"] == "passed" and 0.5 < q["slowdown"] < 2, q


def test_first_ready_heartbeat_is_held_in_starting(gateway_server, sim_engine):
    gw = gateway_server
    url, _ = sim_engine
    worker = RawWorker(gw.url, gw.enroll_token("dc-a"), url)  # declares no speed of its own
    before = finished_requests(url)
    assert worker.beat() == "starting"
    wait_for_worker(gw, worker.id, lambda w: w["state"] == "ready", 10)
    # 1 warm-up, then batches of 1, 4 and 8 run twice each, went straight to the engine, with its key.
    assert finished_requests(url) - before == PROBE_REQUESTS

    record = next(w for w in gw.workers() if w["id"] == worker.id)
    q = record["qualification"]
    assert q["status"] == "passed" and q["declared_tpot_base_ms"] is None
    # With nothing declared, the scheduler's speed model is fitted from the batches...
    assert record["tpot_base_ms"] == q["fit"]["tpot_base_ms"] > 0
    assert record["tpot_ms_per_seq"] == q["fit"]["tpot_ms_per_seq"] >= 0
    assert record["tpot_ms_per_1k_kv"] is None  # not measurable with the probe's short streams
    # ...and is about what the engine's profile says (real time, 1.7 ms/token on H100).
    assert 0.3 < record["tpot_ms"] / sim_engine[1]["tpot_base_ms"] < 3
    assert worker.beat() == "ready"


def test_slow_worker_is_flagged_kept_out_and_cleared_by_an_operator(gateway_server, slow_sim_engine):
    gw = gateway_server
    url, info = slow_sim_engine
    # The worker claims a GPU ten times faster than the engine it points at.
    claimed = info["tpot_base_ms"] / 10
    with RawWorker(gw.url, gw.enroll_token("dc-a"), url, tpot_base_ms=claimed, tpot_ms_per_1k_kv=0.0) as worker:
        record = wait_for_worker(gw, worker.id, lambda w: w["flagged"], 10)
        q = record["qualification"]
        assert record["state"] == "starting" and not record["qualified"]
        assert q["status"] == "flagged" and "slower than" in q["reason"] and q["slowdown"] > 3
        assert q["tpot_ms"] > 3 * claimed
        # Flagged stays flagged: its heartbeats keep saying ready, and nobody probes again.
        probes = finished_requests(url)
        for _ in range(3):
            assert worker.beat() == "starting"
        with gw.client as c:
            assert_refused(c.post("/v1/chat/completions", json=CHAT), 503, "no_worker", "ready")
        assert finished_requests(url) == probes
        table = admin_cli(gw, "workers").stdout
        assert "flagged" in table.splitlines()[1]

        out = admin_cli(gw, "clear", worker.id)
        assert out.returncode == 0, out.stderr
        record = wait_for_worker(gw, worker.id, lambda w: w["state"] == "ready", 5)
        assert record["qualification"]["status"] == "cleared" and not record["flagged"]
        with gw.client as c:
            r = c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200, r.text
        assert worker.beat() == "ready"


def test_worker_whose_engine_does_not_answer_is_flagged(gateway_server):
    gw = gateway_server
    with RawWorker(gw.url, gw.enroll_token("dc-a"), f"http://127.0.0.1:{free_port()}") as worker:
        record = wait_for_worker(gw, worker.id, lambda w: w["flagged"], 10)
    assert record["state"] == "starting"
    assert "unreachable" in record["qualification"]["reason"]
    with gw.admin as admin:
        assert_refused(admin.post("/admin/workers/nobody/clear"), 404, "worker_not_found", "nobody")


def test_engine_with_a_key_the_gateway_does_not_hold_is_flagged(gateway_server, sim_engine):
    gw = gateway_server
    url, _ = sim_engine
    r = httpx.post(gw.url + "/control/enroll", json={
        "token": gw.enroll_token("dc-a"), "center": "dc-a", "model": MODEL, "engine_url": url, "engine_api_key": "wrong",
    })
    credential = r.json()["credential"]
    httpx.post(gw.url + "/control/heartbeat", json={"state": "ready"}, headers={"Authorization": f"Bearer {credential}"})
    record = wait_for_worker(gw, r.json()["worker_id"], lambda w: w["flagged"], 10)
    assert "401" in record["qualification"]["reason"]


def test_only_one_gateway_probes_a_worker(redis_url, sim_engine):
    url, _ = sim_engine
    servers, gateways = zip(*(start_gateway(redis_url) for _ in range(2)))
    try:
        worker = RawWorker(gateways[0].url, gateways[0].enroll_token("dc-a"), url)
        before = finished_requests(url)
        # The worker's first ready heartbeats reach both gateways at the same moment.
        threads = [threading.Thread(target=worker.beat, args=(g.url,)) for g in gateways for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_for_worker(gateways[1], worker.id, lambda w: w["state"] == "ready", 10)
        assert finished_requests(url) - before == PROBE_REQUESTS  # one probe, not two
    finally:
        for server in servers:
            server.stop()


def test_qualification_can_be_turned_off(redis_url, sim_engine):
    url, _ = sim_engine
    server, gw = start_gateway(redis_url, qualify=False)
    try:
        worker = RawWorker(gw.url, gw.enroll_token("dc-a"), url)
        before = finished_requests(url)
        assert worker.beat() == "ready"
        assert finished_requests(url) == before
        assert next(w for w in gw.workers() if w["id"] == worker.id)["qualification"] is None
    finally:
        server.stop()


def test_speed_fit_recovers_a_line_and_ignores_a_falling_one():
    base, per_seq = fit_speed([(1, 2.1), (4, 2.4), (8, 2.8)])
    assert base == pytest.approx(2.0, abs=0.01) and per_seq == pytest.approx(0.1, abs=0.002)
    assert fit_speed([(1, 3.0), (4, 2.5), (8, 2.9)]) == (2.5, 0.0)  # noise, not a trend
    assert fit_speed([(1, 2.0)]) == (2.0, 0.0)


def test_probe_fits_the_cost_of_each_sequence_in_the_batch(gateway_server):
    """An engine that declares no speed gets one from the probe: on an H20 (little
    compute for its bandwidth) each sequence of a 14B model adds ~0.4 ms to a step,
    which is what limits how big a batch meets the TPOT SLO."""
    gw = gateway_server
    with running_sim_engine("h20", "deepseek-r1-distill-qwen-14b") as (url, info):
        with RawWorker(gw.url, gw.enroll_token("dc-a"), url, model="deepseek-r1-distill-qwen-14b") as worker:
            record = wait_for_worker(gw, worker.id, lambda w: w["state"] == "ready" or w["flagged"], 20)
    fit = record["qualification"]["fit"]
    assert record["tpot_ms_per_seq"] == fit["tpot_ms_per_seq"]
    assert 0.7 < fit["tpot_ms_per_seq"] / info["tpot_ms_per_seq"] < 1.4, (fit, info)
    assert 0.8 < fit["tpot_base_ms"] / info["tpot_base_ms"] < 1.25, (fit, info)


@pytest.mark.vllm
def test_real_vllm_worker_qualifies(gateway_server, vllm_engine):
    """The probe speaks the real engine's dialect: vLLM's ignore_eos and return_token_ids."""
    gw = gateway_server
    url, api_key, model = vllm_engine
    with RawWorker(gw.url, gw.enroll_token("dc-a"), url, model=model, engine_api_key=api_key, engine_kind="vllm",
                   gpu="cpu") as worker:
        record = wait_for_worker(gw, worker.id, lambda w: w["state"] == "ready" or w["flagged"], 120)
        q = record["qualification"]
        assert q["status"] == "passed", q
        assert [b["batch"] for b in q["batches"]] == [1, 4, 8]
        assert q["ttft_ms"] > 0 and q["tpot_ms"] > 0 and q["tokens_per_s"] > 0
        # vLLM declares no speed: the fitted model is the scheduler's estimate.
        assert record["tpot_base_ms"] == q["fit"]["tpot_base_ms"] > 0
        with gw.client as c:
            r = c.post("/v1/chat/completions", json={**CHAT, "model": model})
        assert r.status_code == 200, r.text


def test_a_request_that_arrives_while_the_only_worker_qualifies_waits_for_it(redis_url, sim_engine):
    """Held in `starting` for a second or two while it is probed, the worker will be
    ready soon: a request arriving meanwhile waits in the queue and is served by it,
    instead of hearing at once that no worker is ready."""
    url, _ = sim_engine
    server, gw = start_gateway(redis_url, queue_timeout_s=30.0)
    try:
        worker = RawWorker(gw.url, gw.enroll_token("dc-a"), url)
        assert worker.beat() == "starting"  # its probe has begun
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, gw.url + "/v1/chat/completions", json=CHAT,
                                 headers={"Authorization": f"Bearer {gw.api_key}"}, timeout=60)
            with worker:  # heartbeats go on; the probe passes and the worker turns ready
                r = answer.result(timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["x-idlegrid-worker"] == worker.id
        assert next(w for w in gw.workers() if w["id"] == worker.id)["qualification"]["status"] == "passed"
    finally:
        server.stop()
