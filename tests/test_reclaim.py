"""Training takes its GPU back: reclaim signals, yield, sleep and wake.

Real gateway over real Redis, worker agents as subprocesses launching simulated
engines. The only fake is NVML's process list, at the pynvml boundary: a
monkeypatch in the unit tests of `workers.reclaim`, and a stand-in `pynvml`
module put first on the agent's PYTHONPATH for the end-to-end test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pynvml
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.embedded_redis import EmbeddedRedis
from tests.conftest import MODEL, start_gateway, wait_for
from workers.reclaim import ReclaimWatch

SEED = 7  # every worker the same seed: a resumed answer must equal an undisturbed one
FAST_RECLAIM = ("--reclaim-interval", "0.3", "--wake-after", "1")


# -- helpers ---------------------------------------------------------------------


def start_agent(gw, log: Path, *, time_scale: float = 1.0, extra: tuple[str, ...] = (),
                env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gateway.cli", "worker", "--gateway", gw.url, "--token", gw.enroll_token("dc-a"),
           "--center", "dc-a", "--engine", "sim", "--gpu", "h100", "--model", MODEL, "--seed", str(SEED),
           "--time-scale", str(time_scale), "--drain-timeout", "5", *extra]
    with open(log, "wb") as out:
        agent = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    gw.agents.append(agent)  # the fixtures stop it
    return agent



def worker(gw, worker_id: str) -> dict:
    return next(w for w in gw.workers() if w["id"] == worker_id)


def worker_id_of(gw, log: Path) -> str:
    found = wait_for(lambda: re.search(r"enrolled as worker (\S+)", log.read_text()), 30, "the agent to enroll")
    return found.group(1)


def engine_pid_of(log: Path) -> int:
    found = wait_for(lambda: re.search(r"engine started: pid (\d+)", log.read_text()), 20, "the engine to start")
    return int(found.group(1))


def sleep_state(engine_url: str) -> str:
    """"awake", "weights_offloaded" (level 1) or "discard_all" (level 2), as the engine's
    `vllm:engine_sleep_state` says; "paused" if it is paused but awake."""
    states = {}
    for family in text_string_to_metric_families(httpx.get(f"{engine_url}/metrics", timeout=5).text):
        for sample in family.samples:
            if sample.name == "vllm:engine_sleep_state":
                states[sample.labels["sleep_state"]] = sample.value
    asleep = [state for state, value in states.items() if state != "awake" and value == 1]
    if asleep:
        return asleep[0]
    return "paused" if httpx.get(f"{engine_url}/is_sleeping", timeout=5).json()["is_sleeping"] else "awake"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def short_request(gw) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with gw.client as client:
        return client.post("/v1/chat/completions", json=body)


class Stream:
    """One long streamed chat request in a thread; records who served it and what it said."""

    def __init__(self, gw, max_tokens: int):
        self.body = {"model": MODEL, "messages": [{"role": "user", "content": "Prove there are infinitely many primes."}],
                     "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                     "stream_options": {"include_usage": True}}
        self.gw = gw
        self.started = threading.Event()
        self.worker_id: str | None = None
        self.status: int | None = None
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.finishes: list[str] = []
        self.errors: list[dict] = []
        self.usage: dict | None = None
        self.done = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with self.gw.client as client, client.stream("POST", "/v1/chat/completions", json=self.body) as response:
            self.status, self.worker_id = response.status_code, response.headers.get("x-idlegrid-worker")
            self.started.set()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    self.done = self.done or line == "data: [DONE]"
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    self.errors.append(event["error"])
                self.usage = event.get("usage") or self.usage
                for choice in event.get("choices", []):
                    delta = choice.get("delta", {})
                    self.reasoning.append(delta.get("reasoning_content") or "")
                    self.content.append(delta.get("content") or "")
                    if choice.get("finish_reason"):
                        self.finishes.append(choice["finish_reason"])
        self.started.set()

    def wait(self, timeout: float = 60) -> "Stream":
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream did not finish"
        return self

    @property
    def answer(self) -> tuple[str, str]:
        return "".join(self.reasoning), "".join(self.content)


def stream_under_way(gw) -> Stream:
    """A long answer from the fleet, well into its writing."""
    stream = Stream(gw, gw.max_tokens)
    assert stream.started.wait(10) and stream.status == 200
    time.sleep(0.5)
    return stream


# -- a fleet of three simulated workers, in real time ---------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    redis = EmbeddedRedis(tmp / "redis").start()
    server, gw = start_gateway(redis.url, queue_timeout_s=2.0)
    try:
        started = [(start_agent(gw, tmp / f"agent-{name}.log", extra=FAST_RECLAIM), tmp / f"agent-{name}.log")
                   for name in ("a", "b", "c")]
        gw.agent_of = {worker_id_of(gw, log): agent for agent, log in started}
        gw.logs = {worker_id_of(gw, log): log for _, log in started}
        gw.wait_ready(3)
        tpot_ms = gw.workers()[0]["tpot_base_ms"]
        # Long enough (~3 s) that a drain or SIGTERM lands in the middle of it.
        gw.max_tokens = int(3000 / tpot_ms)
        gw.baseline = Stream(gw, gw.max_tokens).wait()  # undisturbed
        assert gw.baseline.status == 200 and gw.baseline.finishes == ["length"] and not gw.baseline.errors
        yield gw
    finally:
        gw.stop_agents()
        server.stop()
        redis.stop()


def test_operator_drain_hands_the_stream_over_sleeps_and_serves_again_after_wake(fleet):
    gw = fleet
    stream = stream_under_way(gw)
    drained = stream.worker_id
    engine_url = worker(gw, drained)["engine_url"]
    with gw.admin as admin:
        assert admin.post(f"/admin/workers/{drained}/drain").status_code == 200

    # The client's answer goes on elsewhere and is the same, token for token, as undisturbed.
    stream.wait()
    assert stream.status == 200 and stream.done and not stream.errors
    assert stream.finishes == ["length"]
    assert stream.usage["completion_tokens"] == gw.max_tokens
    assert stream.answer == gw.baseline.answer
    log = gw.logs[drained]
    assert "handed over 1 in-flight request" in log.read_text()

    # The drained worker ends asleep (its GPU free) and gets no new work.
    wait_for(lambda: sleep_state(engine_url) == "weights_offloaded" and "-> sleeping" in log.read_text(), 10,
             "the engine to sleep")
    assert httpx.get(f"{engine_url}/is_sleeping").json()["is_sleeping"] is True
    assert re.search(r"GPU freed [\d.]+s after the reclaim signal", log.read_text())
    assert worker(gw, drained)["state"] in ("draining", "sleeping")
    for _ in range(4):
        response = short_request(gw)
        assert response.status_code == 200 and response.headers["x-idlegrid-worker"] != drained
    time.sleep(1.2)  # an operator's drain holds however long nothing else signals
    assert sleep_state(engine_url) == "weights_offloaded"

    with gw.admin as admin:
        assert admin.post(f"/admin/workers/{drained}/wake").status_code == 200
    wait_for(lambda: worker(gw, drained)["state"] == "ready", 10, "the woken worker to be ready")
    assert sleep_state(engine_url) == "awake"
    assert re.search(r"waking -> ready: engine serving again [\d.]+s after the wake began", log.read_text())

    # It serves again: with the others drained, it is the one that answers.
    others = [w["id"] for w in gw.workers() if w["id"] != drained]
    with gw.admin as admin:
        for other in others:
            admin.post(f"/admin/workers/{other}/drain")
        try:
            response = short_request(gw)
            assert response.status_code == 200 and response.headers["x-idlegrid-worker"] == drained
        finally:
            for other in others:
                admin.post(f"/admin/workers/{other}/wake")
    gw.wait_ready(len(others) + 1, timeout=15)


def test_sigterm_hands_the_stream_over_instead_of_waiting(fleet):
    gw = fleet
    stream = stream_under_way(gw)
    leaving = stream.worker_id
    agent = gw.agent_of[leaving]
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(5) == 0
    # The agent left while the answer was still being written: it did not wait for it.
    assert not stream.done
    stream.wait()
    assert stream.status == 200 and stream.done and not stream.errors and stream.finishes == ["length"]
    assert stream.answer == gw.baseline.answer
    text = gw.logs[leaving].read_text()
    assert "ready -> draining: stop requested" in text and "handed over 1 in-flight request" in text
    assert leaving not in [w["id"] for w in gw.workers()]


def test_an_engine_paused_behind_idlegrids_back_sleeps_its_worker_and_the_stream_goes_on(fleet):
    gw = fleet
    stream = stream_under_way(gw)
    paused = stream.worker_id
    engine_url = worker(gw, paused)["engine_url"]
    # Someone pauses the engine directly (a training job's script, say), keeping its
    # requests: the stream just stalls, with no abort and no error to react to.
    assert httpx.post(f"{engine_url}/pause", params={"mode": "keep"}).status_code == 200
    try:
        stream.wait(30)  # within seconds, not the engine stream's idle timeout
        assert stream.status == 200 and stream.done and not stream.errors and stream.finishes == ["length"]
        assert stream.answer == gw.baseline.answer
        assert worker(gw, paused)["state"] == "sleeping"
        assert "paused outside idlegrid" in gw.logs[paused].read_text()
        for _ in range(3):
            response = short_request(gw)
            assert response.status_code == 200 and response.headers["x-idlegrid-worker"] != paused
    finally:
        # Resumed the same way, it serves again by itself.
        assert httpx.post(f"{engine_url}/resume").status_code == 200
    wait_for(lambda: worker(gw, paused)["state"] == "ready", 10, "the worker to serve again")
    assert "the engine was woken outside idlegrid" in gw.logs[paused].read_text()

    # Slept behind its back once more, it is the operator's `admin wake` that wakes it.
    assert httpx.post(f"{engine_url}/sleep", params={"level": 1}).status_code == 200
    wait_for(lambda: worker(gw, paused)["state"] == "sleeping", 5, "the worker to report sleeping")
    with gw.admin as admin:
        assert admin.post(f"/admin/workers/{paused}/wake").status_code == 200
    wait_for(lambda: worker(gw, paused)["state"] == "ready", 10, "the woken worker to be ready")
    assert sleep_state(engine_url) == "awake"


# -- reclaim file, end to end ----------------------------------------------------


def test_reclaim_file_sleeps_the_worker_and_removing_it_wakes_it(gateway_server, tmp_path):
    gw = gateway_server
    reclaim_file = tmp_path / "reclaim"
    log = tmp_path / "agent.log"
    start_agent(gw, log, time_scale=20.0, extra=("--reclaim-file", str(reclaim_file), *FAST_RECLAIM))
    worker_id = worker_id_of(gw, log)
    gw.wait_ready(1)
    engine_url = worker(gw, worker_id)["engine_url"]

    reclaim_file.touch()
    touched = time.monotonic()
    wait_for(lambda: worker(gw, worker_id)["state"] == "sleeping", 5, "the worker to report sleeping")
    assert time.monotonic() - touched < 3
    assert sleep_state(engine_url) == "weights_offloaded"
    assert f"reclaim file {reclaim_file} exists" in log.read_text()
    # The only worker sleeps: the client is told at once, not left hanging.
    assert short_request(gw).status_code == 503

    reclaim_file.unlink()
    wait_for(lambda: worker(gw, worker_id)["state"] == "ready", 6, "the worker to be ready again")
    assert sleep_state(engine_url) == "awake"
    assert short_request(gw).status_code == 200
    text = log.read_text()
    assert "every reclaim signal clear for" in text and re.search(r"GPU freed [\d.]+s after the reclaim signal", text)


def test_reclaim_command_with_on_reclaim_stop_stops_and_restarts_the_engine(gateway_server, tmp_path):
    gw = gateway_server
    training = tmp_path / "training-running"
    log = tmp_path / "agent.log"
    agent = start_agent(gw, log, time_scale=20.0,
                        extra=("--reclaim-command", f"test -e {training}", "--on-reclaim", "stop", *FAST_RECLAIM))
    first_engine = engine_pid_of(log)
    worker_id = worker_id_of(gw, log)
    gw.wait_ready(1)

    training.touch()  # the operator's command now exits 0
    wait_for(lambda: not alive(first_engine), 5, "the engine to stop")
    # No engine, yet the worker keeps heartbeating: asleep, not gone.
    wait_for(lambda: worker(gw, worker_id)["state"] == "sleeping", 5, "the worker to report sleeping")
    time.sleep(1.0)
    assert worker(gw, worker_id)["state"] == "sleeping" and agent.poll() is None

    training.unlink()
    wait_for(lambda: worker(gw, worker_id)["state"] == "ready", 15, "a fresh engine to serve")
    engines = re.findall(r"engine started: pid (\d+)", log.read_text())
    assert len(engines) == 2 and alive(int(engines[1]))
    assert short_request(gw).status_code == 200


# -- NVML, end to end, with a stand-in pynvml ------------------------------------

FAKE_PYNVML = '''
"""Stand-in for nvidia-ml-py: GPU 0 runs the pids listed in the JSON file $IDLEGRID_TEST_GPU_PIDS."""
import json
import os
from types import SimpleNamespace


class NVMLError(Exception):
    pass


def nvmlInit():
    pass


def nvmlDeviceGetHandleByIndex(index):
    if int(index) != 0:
        raise NVMLError("Invalid Argument")
    return 0


def nvmlDeviceGetHandleByUUID(uuid):
    raise NVMLError("Not Found")


def nvmlDeviceGetName(handle):
    return "Fake GPU"


def nvmlDeviceGetTotalEnergyConsumption(handle):
    raise NVMLError("Not Supported")


def nvmlDeviceGetPowerUsage(handle):
    raise NVMLError("Not Supported")


def nvmlDeviceGetMemoryInfo(handle):
    return SimpleNamespace(total=80 << 30, used=1 << 30, free=79 << 30)


def nvmlDeviceGetComputeRunningProcesses(handle):
    try:
        with open(os.environ["IDLEGRID_TEST_GPU_PIDS"]) as f:
            pids = json.load(f)
    except (OSError, ValueError):
        pids = []
    return [SimpleNamespace(pid=pid, usedGpuMemory=1 << 30) for pid in pids]
'''


def put_on_gpu(pids_file: Path, pids: list[int]) -> None:
    partial = pids_file.with_suffix(".partial")
    partial.write_text(json.dumps(pids))
    partial.replace(pids_file)  # atomic: the agent never reads half a list


def test_nvml_foreign_process_reclaims_and_its_exit_wakes(gateway_server, tmp_path):
    gw = gateway_server
    fake = tmp_path / "fake_nvml"
    fake.mkdir()
    (fake / "pynvml.py").write_text(FAKE_PYNVML)
    pids_file = tmp_path / "gpu-pids.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "IDLEGRID_TEST_GPU_PIDS": str(pids_file)}
    log = tmp_path / "agent.log"
    start_agent(gw, log, time_scale=20.0, extra=("--reclaim-nvml", "--gpu-index", "0", "--sleep-level", "2", *FAST_RECLAIM),
                env=env)
    engine_pid = engine_pid_of(log)
    put_on_gpu(pids_file, [engine_pid])  # the engine itself on the GPU: no reclaim
    worker_id = worker_id_of(gw, log)
    gw.wait_ready(1)
    time.sleep(1.0)  # a few reclaim checks
    assert worker(gw, worker_id)["state"] == "ready"
    assert "NVML processes on GPU 0" in log.read_text()

    training = subprocess.Popen(["sleep", "60"])
    try:
        put_on_gpu(pids_file, [engine_pid, training.pid])
        wait_for(lambda: worker(gw, worker_id)["state"] == "sleeping", 5, "the worker to yield to training")
        assert f"NVML shows compute process {training.pid} on GPU 0" in log.read_text()
        assert sleep_state(worker(gw, worker_id)["engine_url"]) == "discard_all"
    finally:
        training.kill()
        training.wait()
    put_on_gpu(pids_file, [engine_pid])
    wait_for(lambda: worker(gw, worker_id)["state"] == "ready", 6, "the worker to be ready after training left")
    assert sleep_state(worker(gw, worker_id)["engine_url"]) == "awake"
    assert short_request(gw).status_code == 200


# -- workers.reclaim, unit tests at the pynvml boundary ---------------------------


@pytest.fixture
def gpu_processes(monkeypatch):
    """GPU 0's compute processes, as NVML will report them."""
    pids: list[int] = []
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: f"gpu{index}")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses",
                        lambda handle: [SimpleNamespace(pid=pid, usedGpuMemory=None) for pid in pids])
    return pids


@pytest.fixture
def engine_with_child():
    """A stand-in engine like the agent starts one: a session leader with a child."""
    engine = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    child = int(engine.stdout.readline())
    yield engine.pid, child
    os.killpg(engine.pid, signal.SIGKILL)
    engine.wait()


def test_only_the_engine_and_its_children_on_the_gpu_is_no_reclaim(gpu_processes, engine_with_child):
    engine, child = engine_with_child
    watch = ReclaimWatch(gpus=[0], engine_pid=lambda: engine)
    gpu_processes += [engine, child]
    assert watch.poll() is None


def test_a_foreign_process_on_the_gpu_is_a_reclaim(gpu_processes, engine_with_child):
    engine, child = engine_with_child
    watch = ReclaimWatch(gpus=[0], engine_pid=lambda: engine)
    training = subprocess.Popen(["sleep", "60"])
    try:
        gpu_processes += [engine, child, training.pid]
        reason = watch.poll()
        assert reason and str(training.pid) in reason and str(engine) not in reason
        assert watch.quiet_for() == 0
    finally:
        training.kill()
        training.wait()
    gpu_processes.remove(training.pid)
    assert watch.poll() is None


def test_nvml_errors_and_invisible_pids_are_no_reclaim(gpu_processes, engine_with_child, monkeypatch):
    engine, _ = engine_with_child
    watch = ReclaimWatch(gpus=[0], engine_pid=lambda: engine)
    gpu_processes += [engine, 2**22 + 12345]  # a pid of another pid namespace: cannot be judged
    assert watch.poll() is None

    def no_gpu(handle):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses", no_gpu)
    assert watch.poll() is None


def test_hook_command_and_file(tmp_path):
    flag = tmp_path / "training-wants-gpu"
    clock = [100.0]
    watch = ReclaimWatch(command=f"test -e {flag}.hook", file=flag, clock=lambda: clock[0])
    assert watch.poll() is None
    clock[0] += 3
    assert watch.quiet_for() == 3

    flag.touch()
    assert "reclaim file" in watch.poll() and watch.quiet_for() == 0
    flag.unlink()
    Path(f"{flag}.hook").touch()
    assert "exited 0" in watch.poll()
    Path(f"{flag}.hook").unlink()
    assert watch.poll() is None
    clock[0] += 1.5
    assert watch.quiet_for() == 1.5
