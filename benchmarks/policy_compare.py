"""Every routing policy, and vllm-router, on one simulated heterogeneous fleet in three centers.

    python -m benchmarks.policy_compare            # the committed run (about 30 minutes on 2 cores)
    python -m benchmarks.policy_compare --quick    # a smoke run (under a minute)

The issue-3 benchmark. One set of simulated engines (`idlegrid sim-engine`, a
process per worker group) stands for a fleet in three centers; each center's
round trip from the gateway's center is added to its engines' responses. Then,
one configuration at a time, the same engines are served by:

* an idlegrid gateway (`idlegrid gateway`, a fresh process on a flushed Redis)
  with each built-in policy; the engines are enrolled through the gateway's
  control API with their GPU profile and heartbeat their load and modeled
  energy every second, as `idlegrid worker --engine sim` reports them;
* vllm-router (PyPI `vllm-router`) with its round_robin, power_of_two and
  cache_aware policies, pointed at the same engine URLs.

Each configuration gets R1-style open-loop Poisson load at fractions of the
fleet's capacity, driven by `idlegrid bench`'s runner and metrics. Capacity is
computed from the simulator's GPU and model profiles (`workers/sim/profiles.py`):
for every GPU, the decode throughput at the largest batch whose modeled time
per output token meets the TPOT SLO (within max_num_seqs and the KV cache),
summed over the fleet and divided by the mean output length.

Everything is simulated: latency and throughput come from the roofline model
of each GPU, energy from its power model (labelled `modeled`). Simulated time
runs `time_scale` times as fast as the wall clock; the bench measures wall-clock
time, and every latency and rate here is converted to simulated time (latency x
time_scale, rates / time_scale), so the SLO is judged in simulated time. The
routers' and the client's own processing time is wall time and is scaled the
same way, alike for every configuration.

`--placement-check` needs no serving at all: it runs each policy's own code on
snapshots of the issue's full-size fleet (see `placement_check`).

Output: `--out` (default benchmarks/results/policies/) gets one folder per
configuration with `results.json` (the bench's schema, one run per load
level), plus `summary.json`, `README.md` (the table) and PNG plots.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import random
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import httpx

from benchmarks.client import RequestRecord
from benchmarks.energy import EnergyReadError, EnergySampler, WorkerReading, energy_over_window, parse_prometheus_energy
from benchmarks.metrics import energy_between, percentile, request_tpot, steady_window, summarize
from benchmarks.report import Figure, write_results
from benchmarks.runner import LoadLevel, Target, run_level
from benchmarks.workloads import R1_INPUT, R1_INSTRUCTION, BenchRequest, LogNormal, filler_text
from gateway.embedded_redis import EmbeddedRedis, free_port
from gateway.fleet_file import Fleet, load_fleet
from gateway.policies import POLICIES
from workers.engine_metrics import parse_metrics
from workers.sim.profiles import PerfModel, get_gpu, get_model
from workers.sim.tokens import render_chat

log = logging.getLogger("idlegrid.policy_compare")

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "policies"
IDLEGRID_POLICIES = ("round_robin", "random", "least_load", "power_of_two", "prefix_affinity", "slo_pack")
VLLM_ROUTER_POLICIES = ("round_robin", "power_of_two", "cache_aware")


# --- settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What one benchmark run is; `FULL` and `QUICK` below are the two shipped ones."""

    fleet: Path
    time_scale: float  # simulated seconds per wall second
    # R1-style output lengths: the bench's r1 log-normal (median 4,000, sigma 0.9, [256, 32,768])
    # with median and bounds multiplied by this, so a run fits the machine.
    output_scale: float
    # Clip outputs at this many medians (R1's own cap, 32,768, is 8.2 medians); a shorter
    # tail keeps the drain after the last arrival short.
    output_cap_medians: float
    loads: tuple[float, ...]  # fractions of fleet capacity
    send_s: float  # simulated seconds of arrivals per load level
    slo_ttft_ms: float = 2000.0  # simulated ms
    slo_tpot_ms: float = 60.0  # simulated ms; slo_pack's own target
    max_num_seqs: int = 256  # vLLM's default
    gateway_center: str = ""  # default: the fleet file's first center
    # Prompt lengths: R1's (median 120) times this. Shortening outputs alone turns R1's
    # decode-bound work into prefill-bound work; scaling both keeps R1's proportions
    # (the instruction line stays whole, so a prompt never drops below ~20 tokens).
    prompt_scale: float = 1.0
    idlegrid_policies: tuple[str, ...] = IDLEGRID_POLICIES
    router_policies: tuple[str, ...] = VLLM_ROUTER_POLICIES
    seed: int = 0
    energy_interval_s: float = 0.25  # wall seconds between energy readings
    full_scale_placement: bool = True  # add the full-size fleet's placement check (~10 s) to the results

    @property
    def output_lengths(self) -> LogNormal:
        median = 4000 * self.output_scale
        return LogNormal(median=median, sigma=0.9, low=max(8, round(256 * self.output_scale)),
                         high=max(16, round(min(32768 * self.output_scale, self.output_cap_medians * median))))

    @property
    def prompt_lengths(self) -> LogNormal:
        return LogNormal(median=R1_INPUT.median * self.prompt_scale, sigma=R1_INPUT.sigma,
                         low=max(1, round(R1_INPUT.low * self.prompt_scale)), high=max(2, round(R1_INPUT.high * self.prompt_scale)))

    def slo_wall(self) -> dict[str, float]:
        """The SLO in the wall-clock milliseconds the bench measures."""
        return {"ttft_ms": self.slo_ttft_ms / self.time_scale, "tpot_ms": self.slo_tpot_ms / self.time_scale}


# The committed run. Scaled to what this 2-core machine can drive with every token
# relayed through one Python gateway process (about 1k tokens/s of wall time while
# other jobs share the machine): 4 GPUs, 32 sequences each, R1-shaped outputs 64
# times shorter, engines 10 times slower than real time. README.md says what that
# changes.
FULL = Settings(
    fleet=ROOT / "fleets" / "three-centers-small.toml",
    time_scale=0.1,
    output_scale=1 / 64,
    output_cap_medians=3.0,
    loads=(0.5, 0.8, 0.95),
    send_s=3.0,
    max_num_seqs=32,
)
# A smoke run of every moving part: two policies and one vllm-router policy, one load.
QUICK = dataclasses.replace(
    FULL,
    time_scale=0.5,
    output_scale=1 / 128,
    max_num_seqs=4,
    loads=(0.8,),
    send_s=0.5,
    idlegrid_policies=("round_robin", "slo_pack"),
    router_policies=("round_robin",),
    full_scale_placement=False,
)


# --- workload and capacity ------------------------------------------------------------------


def r1_requests(n: int, outputs: LogNormal, seed: int, text_seed: str, prompts: LogNormal = R1_INPUT) -> list[BenchRequest]:
    """R1-style requests (short math prompts, long reasoning outputs) with scaled lengths.
    Same `seed`: same lengths; `text_seed` gives each level fresh prompt text."""
    lengths, text = random.Random(seed), random.Random(text_seed)
    instruction_len = len(R1_INSTRUCTION.split())
    requests = []
    for i in range(n):
        input_len, output_len = prompts.draw(lengths), outputs.draw(lengths)
        input_len = max(input_len, instruction_len + 1)  # the body is at least one word
        body = filler_text(input_len - instruction_len, text)
        messages = [{"role": "user", "content": f"{body}\n{R1_INSTRUCTION}"}]
        requests.append(BenchRequest(index=i, messages=messages, input_len=input_len, output_len=output_len))
    return requests


@dataclass
class GpuCapacity:
    gpu: str
    batch: int  # the largest batch meeting the TPOT SLO
    tpot_ms: float  # modeled TPOT at that batch
    tokens_per_s: float  # decode throughput at that batch (simulated time)
    limited_by: str  # "tpot_slo", "max_num_seqs" or "kv_cache"


def gpu_capacity(perf: PerfModel, prompt_mean: float, output_mean: float, output_sq_mean: float,
                 tpot_slo_ms: float, max_num_seqs: int) -> GpuCapacity:
    """Steady decode throughput of one GPU at the largest batch that meets the TPOT SLO.

    Prefill shares the steps: at batch B, B/L requests finish per step (Little's law with
    L output tokens each), so as many arrive, and their prompts add B x prompt / L
    computed tokens to every step on average. Counting them keeps the nominal load
    honest when prompts are long next to outputs.

    A running sequence holds its prompt plus the output made so far; over a
    request's life that averages prompt + L/2, and longer requests are running
    for longer, so the KV tokens of a randomly picked running sequence average
    prompt + E[L^2] / (2 E[L]). The KV bound counts what the gateway reserves
    (prompt + whole output) against 90% of the cache, as its headroom check does."""
    context = prompt_mean + output_sq_mean / (2 * output_mean)
    kv_bound = int(0.9 * perf.kv_capacity_tokens // (prompt_mean + output_mean))
    prefill_per_seq = prompt_mean / output_mean  # prompt tokens computed per decoded token

    def step_s(batch: int) -> float:
        return perf.step_seconds(round(batch * (1 + prefill_per_seq)), int(batch * context), batch)

    best = GpuCapacity(perf.gpu.id, 1, step_s(1) * 1000, 0.0, "tpot_slo")
    for batch in range(1, max_num_seqs + 1):
        if batch > kv_bound:
            best.limited_by = "kv_cache"
            break
        seconds = step_s(batch)
        if seconds * 1000 > tpot_slo_ms:
            break
        best = GpuCapacity(perf.gpu.id, batch, seconds * 1000, batch / seconds, "max_num_seqs" if batch == max_num_seqs else "tpot_slo")
    return best


def fleet_capacity(fleet: Fleet, requests: Sequence[BenchRequest], settings: Settings) -> dict:
    """Requests per simulated second the fleet serves within the TPOT SLO (see `gpu_capacity`).
    Prompt tokens are what the simulated engines prefill (their tokenizer and chat
    template), not the drawn lengths: the R1 instruction alone is 42 of their tokens."""
    prompt_mean = sum(len(render_chat(r.messages)) for r in requests) / len(requests)
    output_mean = sum(r.output_len for r in requests) / len(requests)
    output_sq_mean = sum(r.output_len**2 for r in requests) / len(requests)
    per_gpu, total = [], 0.0
    for group in fleet.groups:
        perf = PerfModel(get_gpu(group.gpu), get_model(group.model))
        cap = gpu_capacity(perf, prompt_mean, output_mean, output_sq_mean, settings.slo_tpot_ms, settings.max_num_seqs)
        per_gpu.append({"center": group.center, "count": group.count, **dataclasses.asdict(cap)})
        total += cap.tokens_per_s * group.count
    return {
        "method": "modeled from the simulator's GPU/model profiles at the TPOT SLO, the prefill of arriving prompts included (not a measured saturation run)",
        "prompt_tokens_mean": prompt_mean,
        "output_tokens_mean": output_mean,
        "output_tokens_per_s": total,
        "requests_per_s": total / output_mean,
        "per_gpu_group": per_gpu,
    }


# --- processes ------------------------------------------------------------------------------


def _python() -> list[str]:
    return [sys.executable, "-m", "gateway.cli", "--log-level", "WARNING"]


def _stop(process: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, the process group we started."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass
class Engine:
    url: str
    center: str
    gpu: str
    model: str
    idle_w: float
    max_num_seqs: int


class SimFleet:
    """One `idlegrid sim-engine` process per worker group, with its center's round trip."""

    def __init__(self, fleet: Fleet, settings: Settings, gateway_center: str, log_dir: Path):
        self.fleet = fleet
        self.settings = settings
        self.gateway_center = gateway_center
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen] = []
        self.engines: list[Engine] = []

    def start(self, timeout: float = 60.0) -> None:
        for i, group in enumerate(self.fleet.groups):
            rtt = self.fleet.rtt(self.gateway_center, group.center)
            cmd = [*_python(), "sim-engine", "--port", "0", "--count", str(group.count), "--gpu", group.gpu,
                   "--model", group.model, "--time-scale", str(self.settings.time_scale), "--seed", str(i),
                   "--max-num-seqs", str(self.settings.max_num_seqs), "--extra-latency-ms", str(rtt)]
            stderr = open(self.log_dir / f"sim-{i}-{group.center}-{group.gpu}.log", "ab")
            process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)
            self.processes.append(process)
            line = _first_line(process, timeout)
            if " at " not in line:
                raise RuntimeError(f"sim-engine for {group.center}/{group.gpu} did not start: {line!r} (see {stderr.name})")
            urls = [u.strip() for u in line.rsplit(" at ", 1)[1].split(",")]
            gpu = get_gpu(group.gpu)
            self.engines += [Engine(u, group.center, group.gpu, group.model, gpu.idle_w, self.settings.max_num_seqs) for u in urls]

    def stop(self) -> None:
        for process in self.processes:
            _stop(process)


def _first_line(process: subprocess.Popen, timeout: float) -> str:
    """The process's first line of stdout, or '' if it exits or stays silent."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if selector.select(timeout):
            return process.stdout.readline().strip()
    return ""


async def _wait_http(url: str, timeout: float, process: subprocess.Popen | None = None, what: str = "server") -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{what} exited with status {process.returncode} while starting")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f}s")


class SimWorkers:
    """Worker agents for the engines this benchmark started, speaking the gateway's
    control API as `idlegrid worker --engine sim` does: enroll with the engine's
    profile (`/v1/sim/info`), then heartbeat its `/metrics` load and modeled energy
    every second. (The real agent launches its own engine, which could not carry a
    center's round trip; these attach to ours.) They run on an event loop of their
    own in a thread, so a benchmark client busy with hundreds of streams cannot
    delay heartbeats past the gateway's freshness limit."""

    def __init__(self, engines: Sequence[Engine], gateway_url: str):
        self.engines = list(engines)
        self.gateway_url = gateway_url
        self.worker_ids: dict[str, str] = {}  # engine URL -> worker id
        self._credentials: dict[str, str] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sim-workers", daemon=True)
        self._client: httpx.AsyncClient | None = None
        self._beats: list[asyncio.Task] = []

    def _call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def start(self, tokens: Sequence[str]) -> None:
        """Enroll every engine (one enrollment token each) and start heartbeating."""
        self._thread.start()
        await asyncio.to_thread(self._call, self._start(list(tokens)))

    async def _start(self, tokens: list[str]) -> None:
        self._client = httpx.AsyncClient(timeout=10.0)
        for engine, token in zip(self.engines, tokens):
            info = (await self._client.get(f"{engine.url}/v1/sim/info")).json()
            body = {
                "token": token, "center": engine.center, "gpu": engine.gpu, "model": engine.model,
                "engine_url": engine.url, "engine_kind": "sim", "max_num_seqs": info["max_num_seqs"],
                "kv_capacity_tokens": info["kv_capacity_tokens"], "tpot_base_ms": info["tpot_base_ms"],
                "tpot_ms_per_1k_kv": info["tpot_ms_per_1k_kv"], "tpot_ms_per_seq": info["tpot_ms_per_seq"],
            }
            response = await self._client.post(f"{self.gateway_url}/control/enroll", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"enrolling {engine.url} failed: {response.status_code} {response.text[:200]}")
            reply = response.json()
            self.worker_ids[engine.url] = reply["worker_id"]
            self._credentials[engine.url] = reply["credential"]
            self._beats.append(asyncio.create_task(self._beat_forever(engine)))

    async def _heartbeat(self, engine: Engine) -> None:
        assert self._client is not None
        metrics = parse_metrics((await self._client.get(f"{engine.url}/metrics")).text)
        body = {
            "state": "ready", "running": metrics.running, "waiting": metrics.waiting, "kv_usage": metrics.kv_usage,
            "power_w": metrics.power_w, "energy_j": metrics.energy_j, "energy_source": "modeled",
        }
        await self._client.post(f"{self.gateway_url}/control/heartbeat", json=body,
                                headers={"Authorization": f"Bearer {self._credentials[engine.url]}"})

    async def _beat_forever(self, engine: Engine, interval_s: float = 1.0) -> None:
        while True:
            started = time.monotonic()
            with contextlib.suppress(httpx.HTTPError, ValueError):
                await self._heartbeat(engine)
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))

    async def stop(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self._call, self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join, 10)
        self._loop.close()

    async def _stop(self) -> None:
        for task in self._beats:
            task.cancel()
        await asyncio.gather(*self._beats, return_exceptions=True)
        if self._client is not None:
            for url, credential in self._credentials.items():
                with contextlib.suppress(httpx.HTTPError):
                    await self._client.post(f"{self.gateway_url}/control/deregister",
                                            headers={"Authorization": f"Bearer {credential}"})
            await self._client.aclose()


class IdlegridGateway:
    """`idlegrid gateway` processes on one Redis and one port, one policy at a time.

    The first start flushes Redis, enrolls every engine and waits for the gateway's
    qualification probe to pass them; each later policy is a gateway restart with
    another `--policy`, so every policy serves the same qualified workers (whose
    heartbeats simply resume) without paying for the probe again. Between policies
    the fleet has drained, so no reservation or queued request is carried over."""

    def __init__(self, redis: EmbeddedRedis, engines: Sequence[Engine], center: str, log_dir: Path,
                 center_rtt_ms: dict[str, float] | None = None):
        self.redis = redis
        self.engines = list(engines)
        self.center = center
        self.center_rtt_ms = center_rtt_ms or {}  # the fleet file's round trips, until the gateway measures them
        self.log_dir = log_dir
        self.admin_token = "adm-" + secrets.token_urlsafe(16)
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.workers: SimWorkers | None = None
        self.api_key = ""
        self.cleared: list[str] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, policy: str) -> Endpoint:
        """Stop the running gateway, if any, and start one with `policy`."""
        _stop(self.process)
        if self.workers is None:
            import redis as redis_sync

            redis_sync.Redis.from_url(self.redis.url).flushall()
        cmd = [*_python(), "gateway", "--redis", self.redis.url, "--host", "127.0.0.1", "--port", str(self.port),
               "--center", self.center, "--policy", policy, "--admin-token", self.admin_token,
               "--center-rtt", ",".join(f"{c}={ms:g}" for c, ms in self.center_rtt_ms.items())]
        log_file = open(self.log_dir / "idlegrid-gateway.log", "ab")
        self.process = subprocess.Popen(cmd, stdout=log_file, stderr=log_file, start_new_session=True)
        await _wait_http(f"{self.base_url}/health", 30, self.process, f"gateway ({policy})")
        admin = {"Authorization": f"Bearer {self.admin_token}"}
        async with httpx.AsyncClient(base_url=self.base_url, headers=admin, timeout=10.0) as client:
            if self.workers is None:
                response = await client.post("/admin/keys", json={"name": "bench"})
                response.raise_for_status()
                self.api_key = response.json()["key"]
                tokens = []
                for engine in self.engines:
                    response = await client.post("/admin/enroll-tokens", json={"center": engine.center, "uses": 1, "ttl_s": 600})
                    response.raise_for_status()
                    tokens.append(response.json()["token"])
                self.workers = SimWorkers(self.engines, self.base_url)
                await self.workers.start(tokens)
            await self._wait_ready(client, policy)
        return Endpoint(f"idlegrid-{policy}", self.base_url, self.api_key, dict(self.workers.worker_ids))

    async def _wait_ready(self, client: httpx.AsyncClient, policy: str, timeout: float = 90.0) -> None:
        """New workers serve once the gateway's qualification probe passes them. A probe
        slowed by this busy machine can still flag one as slow: we vouch for those, as an
        operator would."""
        deadline = time.monotonic() + timeout
        workers: list[dict] = []
        while time.monotonic() < deadline:
            workers = (await client.get("/admin/workers")).json()["workers"]
            if sum(w["state"] == "ready" for w in workers) >= len(self.engines):
                return
            for w in workers:
                if w.get("flagged") and w["id"] not in self.cleared:
                    (await client.post(f"/admin/workers/{w['id']}/clear")).raise_for_status()
                    self.cleared.append(w["id"])
            await asyncio.sleep(0.25)
        raise RuntimeError(f"not every worker became ready on the {policy} gateway: "
                           + ", ".join(f"{w['id']} {w['state']}" for w in workers))

    async def close(self) -> None:
        if self.workers is not None:
            await self.workers.stop()
        _stop(self.process)


@dataclass
class Endpoint:
    """Where one configuration's requests go."""

    name: str
    base_url: str
    api_key: str = ""
    worker_ids: dict[str, str] = field(default_factory=dict)  # engine URL -> worker id, where the router names them


class VllmRouterEndpoint:
    """vllm-router (the PyPI package's Rust router) in front of the same engines."""

    kind = "vllm-router"

    def __init__(self, policy: str, engines: Sequence[Engine], log_dir: Path):
        self.policy = policy
        self.name = f"vllm-router-{policy}"
        self.engines = list(engines)
        self.log_dir = log_dir
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Endpoint:
        binary = vllm_router_binary()
        if binary is None:
            raise RuntimeError(VLLM_ROUTER_MISSING)
        cmd = [binary, "--host", "127.0.0.1", "--port", str(self.port), "--policy", self.policy,
               "--prometheus-port", str(free_port()), "--log-level", "warning",
               "--worker-urls", *[e.url for e in self.engines]]
        log_file = open(self.log_dir / f"{self.name}.log", "ab")
        self.process = subprocess.Popen(cmd, stdout=log_file, stderr=log_file, start_new_session=True)
        await _wait_http(f"{self.base_url}/health", 60, self.process, f"vllm-router ({self.policy})")
        return Endpoint(self.name, self.base_url)

    async def stop(self) -> None:
        _stop(self.process)


VLLM_ROUTER_MISSING = "vllm-router is not installed (pip install vllm-router)"


def vllm_router_binary() -> str | None:
    import shutil

    beside = Path(sys.executable).parent / "vllm-router"
    return str(beside) if beside.exists() else shutil.which("vllm-router")


# --- energy, load and lag, read straight from the engines ------------------------------------


class EngineMeters:
    """Every engine's /metrics page: the modeled energy counters `EnergySampler` reads,
    and beside each reading the tokens every engine has generated, so tokens per joule
    can be taken at the engines (what they made over what they burned) as well as at
    the client. Also the wall time each simulation ran late (its fidelity check)."""

    def __init__(self, engines: Sequence[Engine]):
        self.engines = list(engines)
        self.description = f"{len(self.engines)} simulated engines' /metrics"
        self.ids = {e.url: e.url for e in self.engines}
        self.t0 = time.perf_counter()
        self.token_samples: list[tuple[float, dict[str, float]]] = []  # (run clock s, {worker: tokens})
        self._client = httpx.AsyncClient(timeout=10.0)

    def restart(self, t0: float, ids: dict[str, str]) -> None:
        self.t0, self.ids, self.token_samples = t0, ids, []

    async def _page(self, engine: Engine) -> str:
        try:
            response = await self._client.get(f"{engine.url}/metrics")
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise EnergyReadError(f"{engine.url}/metrics: {exc!r}") from None
        return response.text

    async def read(self) -> list[WorkerReading]:
        pages = await asyncio.gather(*(self._page(e) for e in self.engines))
        now = time.perf_counter() - self.t0
        readings, tokens = [], {}
        for engine, page in zip(self.engines, pages):
            for reading in parse_prometheus_energy(page, default_id=self.ids[engine.url]):
                reading.center = engine.center
                readings.append(reading)
            tokens[self.ids[engine.url]] = _counters(page)["generation_tokens"]
        self.token_samples.append((now, tokens))
        return readings

    async def counters(self) -> dict[str, dict[str, float]]:
        """{engine URL: generation_tokens, lag_s, running, waiting} now."""
        for attempt in range(5):
            try:
                pages = await asyncio.gather(*(self._page(e) for e in self.engines))
                break
            except EnergyReadError:
                if attempt == 4:
                    raise
                await asyncio.sleep(1.0)
        return {engine.url: _counters(page) for engine, page in zip(self.engines, pages)}

    def generated_between(self, t0: float, t1: float) -> float:
        """Tokens all engines generated in [t0, t1] (run clock), interpolated between readings."""
        total = 0.0
        for worker in self.ids.values():
            series = [(t, values[worker]) for t, values in self.token_samples if worker in values]
            if series:
                total += energy_between(series, t0, t1)  # any cumulative counter, not only joules
        return total

    async def close(self) -> None:
        await self._client.aclose()


def _counters(page: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    names = {
        "vllm:generation_tokens_total": "generation_tokens", "idlegrid_sim_lag_seconds_total": "lag_s",
        "vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
    }
    values = dict.fromkeys(names.values(), 0.0)
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name in names:
                values[names[sample.name]] = sample.value
    return values


# --- one load level -------------------------------------------------------------------------


async def run_one_level(endpoint: Endpoint, meters: EngineMeters, engines: Sequence[Engine], requests: list[BenchRequest],
                        rate_wall: float, settings: Settings, seed: int, model: str) -> tuple[dict, list[RequestRecord]]:
    """Send `requests` at `rate_wall` (Poisson) through `endpoint`; the bench's summary
    plus energy, idle GPUs and simulation lag, all in simulated time where it matters."""
    headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    t0 = time.perf_counter()
    meters.restart(t0, {e.url: endpoint.worker_ids.get(e.url, e.url) for e in engines})
    sampler = EnergySampler(meters, t0, settings.energy_interval_s)
    before = await meters.counters()
    await sampler.sample_once()
    stop_sampling = asyncio.Event()
    sampling = asyncio.create_task(sampler.run(stop_sampling))
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0), limits=limits) as client:
        target = Target(client, f"{endpoint.base_url}/v1/chat/completions", headers, model)
        result = await run_level(target, requests, LoadLevel(rate=rate_wall), t0, asyncio.Event(), seed)
    stop_sampling.set()
    await sampling
    await sampler.sample_once()
    after = await meters.counters()

    records = result.records
    window = steady_window([(r.start_s, r.end_s) for r in records])
    summary = summarize(records, result.duration_s, settings.slo_wall())
    energy = energy_over_window(sampler.snapshots, window, records, model)
    if window is not None and energy.get("energy_joules"):
        generated = meters.generated_between(window.start_s, window.end_s)
        energy["engine_generated_tokens"] = generated
        energy["engine_tokens_per_joule"] = generated / energy["energy_joules"]
    if window is not None and energy.get("engine_generated_tokens") is not None and window.length_s > 0:
        entry_tokens_per_s = energy["engine_generated_tokens"] / (window.length_s * settings.time_scale)
    else:
        entry_tokens_per_s = None
    entry = {
        "label": f"{rate_wall / settings.time_scale:.3g} req/s simulated",
        "request_rate": rate_wall,
        "burstiness": 1.0,
        "num_prompts": len(requests),
        "sent": len(records),
        "steady_window": window.to_json() if window else None,
        **summary,
        **energy,
        "simulated": simulated_view(records, summary, energy, settings, result.duration_s),
        "idle_gpus": idle_gpus(energy, engines, meters.ids),
        "per_engine": [
            {
                "engine": e.url, "worker": meters.ids[e.url], "center": e.center, "gpu": e.gpu,
                "generated_tokens": after[e.url]["generation_tokens"] - before[e.url]["generation_tokens"],
                "lag_wall_s": after[e.url]["lag_s"] - before[e.url]["lag_s"],
            }
            for e in engines
        ],
    }
    entry["simulated"]["steady_engine_tokens_per_s"] = entry_tokens_per_s
    # Other work on the machine slows the gateway's relay (the engines' clocks do not
    # notice): the load average tells a reader how shared the CPUs were.
    entry["machine_load_average_1m"] = os.getloadavg()[0]
    entry["machine_cpus"] = os.cpu_count()
    examples: dict[str, str] = {}
    for record in records:
        if record.error_kind and record.error_kind not in examples:
            examples[record.error_kind] = record.error
    entry["failure_examples"] = examples
    entry["max_lag_wall_s"] = max((p["lag_wall_s"] for p in entry["per_engine"]), default=0.0)
    return entry, records


def simulated_view(records: Sequence[RequestRecord], summary: dict, energy: dict, settings: Settings, duration_s: float) -> dict:
    """The figures that depend on the clock, in simulated time (latency x scale, rates / scale)."""
    x = settings.time_scale
    done = [r for r in records if r.success]
    ttft = [r.ttft_s * 1000 * x for r in done if r.ttft_s is not None]
    tpot = [t * 1000 * x for t in (request_tpot(r) for r in done) if t is not None]
    sent = len(records)

    def p(values: list[float], q: float) -> float | None:
        return percentile(values, q) if values else None

    good = summary.get("good_requests") or 0
    return {
        "time_scale": x,
        "duration_s": duration_s * x,
        "request_rate": None,
        "goodput_req_s": None,  # offered rate x good_fraction, set by the caller that knows the rate
        "good_fraction": good / sent if sent else 0.0,
        "completed_fraction": len(done) / sent if sent else 0.0,
        "output_tokens_per_s": summary["output_throughput"] / x,
        "steady_engine_tokens_per_s": None,
        "p50_ttft_ms": p(ttft, 50),
        "p99_ttft_ms": p(ttft, 99),
        "p50_tpot_ms": p(tpot, 50),
        "p99_tpot_ms": p(tpot, 99),
    }


def idle_gpus(energy: dict, engines: Sequence[Engine], ids: dict[str, str]) -> dict:
    """GPUs that did no work in the steady window: their modeled power never left idle.
    Within 0.1% of idle, for the counters' rounding: one decode step in a window of a
    few seconds lifts the average far more."""
    idle_w = {ids[e.url]: e.idle_w for e in engines}
    idle = [w["worker"] for w in energy.get("energy_by_worker", [])
            if w.get("avg_power_w") is not None and w["avg_power_w"] <= idle_w.get(w["worker"], 0.0) * 1.001]
    return {"count": len(idle), "of": len(engines), "workers": idle}


# --- the whole comparison ------------------------------------------------------------------


@dataclass
class ConfigResult:
    name: str
    router: str  # "idlegrid" or "vllm-router"
    policy: str
    runs: list[dict] = field(default_factory=list)
    records: dict[float, list[RequestRecord]] = field(default_factory=dict)  # by load
    error: str | None = None


async def compare(settings: Settings, out: Path, work_dir: Path, command: str = "python -m benchmarks.policy_compare") -> dict:
    began = time.monotonic()
    fleet = load_fleet(settings.fleet)
    center = settings.gateway_center or fleet.groups[0].center
    model = fleet.groups[0].model
    if any(g.model != model for g in fleet.groups):
        raise SystemExit("policy_compare: every worker group must serve the same model")
    # The same lengths at every level and for every configuration; fresh prompt text per level.
    rough = r1_requests(2000, settings.output_lengths, settings.seed, "capacity", settings.prompt_lengths)
    capacity = fleet_capacity(fleet, rough, settings)
    levels = []
    for i, load in enumerate(settings.loads):
        rate_sim = load * capacity["requests_per_s"]
        n = max(4, round(rate_sim * settings.send_s))
        levels.append((load, rate_sim, r1_requests(n, settings.output_lengths, settings.seed + i, f"level-{i}",
                                                   settings.prompt_lengths)))

    logs = work_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    redis = EmbeddedRedis(work_dir / "redis").start()
    sims = SimFleet(fleet, settings, center, logs)
    results: list[ConfigResult] = []
    try:
        sims.start()
        meters = EngineMeters(sims.engines)
        rtt = {c: fleet.rtt(center, c) for c in fleet.centers if c != center}
        gateway = IdlegridGateway(redis, sims.engines, center, logs, rtt)
        try:
            for policy in settings.idlegrid_policies:
                config = ConfigResult(f"idlegrid-{policy}", "idlegrid", policy)
                results.append(config)
                await _run_config(config, lambda: gateway.serve(policy), None, meters, sims.engines, levels, settings, model)
        finally:
            await gateway.close()
        for policy in settings.router_policies:
            router = VllmRouterEndpoint(policy, sims.engines, logs)
            config = ConfigResult(router.name, "vllm-router", policy)
            results.append(config)
            await _run_config(config, router.start, router.stop, meters, sims.engines, levels, settings, model)
        await meters.close()
    finally:
        sims.stop()
        redis.stop()
    summary = build_summary(settings, fleet, center, model, capacity, levels, results)
    summary["wall_s"] = time.monotonic() - began
    summary["command"] = command
    if settings.full_scale_placement:
        summary["full_scale_placement"] = full_scale_placement(settings.loads)
    write_outputs(out, summary, results, settings)
    return summary


async def _run_config(config: ConfigResult, start, stop, meters: EngineMeters, engines: Sequence[Engine],
                      levels: list, settings: Settings, model: str) -> None:
    """Every load level through one configuration; one that cannot start is recorded, not fatal."""
    try:
        endpoint = await start()
    except Exception as exc:
        config.error = f"{type(exc).__name__}: {exc}"
        log.error("%s: %s", config.name, config.error)
        if stop is not None:
            await stop()
        return
    try:
        for i, (load, rate_sim, requests) in enumerate(levels):
            started = time.monotonic()
            entry, records = await run_one_level(endpoint, meters, engines, requests,
                                                 rate_sim * settings.time_scale, settings, settings.seed + i, model)
            entry["load"] = load
            entry["simulated"]["request_rate"] = rate_sim
            entry["simulated"]["goodput_req_s"] = rate_sim * entry["simulated"]["good_fraction"]
            config.runs.append(entry)
            config.records[load] = records
            sim = entry["simulated"]
            print(
                f"{config.name:<28} load {load:>4.0%}: {entry['completed']}/{entry['sent']} ok, "
                f"SLO met {sim['good_fraction']:.0%}, goodput {sim['goodput_req_s']:.2f} req/s, "
                f"TTFT p99 {_f(sim['p99_ttft_ms'], 0)} ms, TPOT p99 {_f(sim['p99_tpot_ms'], 1)} ms, "
                f"tokens/J {_f(entry.get('engine_tokens_per_joule'), 2)}, idle GPUs {entry['idle_gpus']['count']}, "
                f"lag {entry['max_lag_wall_s']:.2f}s, failures {entry['failures'] or 'none'} "
                f"({time.monotonic() - started:.0f}s wall)",
                flush=True,
            )
            await _wait_engines_idle(meters)
    finally:
        if stop is not None:
            await stop()


async def _wait_engines_idle(meters: EngineMeters, timeout: float = 30.0) -> None:
    """Between levels: nothing left running anywhere (aborted streams free at once)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counters = await meters.counters()
        if all(c["running"] == 0 and c["waiting"] == 0 for c in counters.values()):
            return
        await asyncio.sleep(0.2)


def _f(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


# --- summary, table and plots --------------------------------------------------------------


def build_summary(settings: Settings, fleet: Fleet, center: str, model: str, capacity: dict,
                  levels: list, results: list[ConfigResult]) -> dict:
    table = []
    for config in results:
        for run in config.runs:
            sim = run["simulated"]
            table.append({
                "config": config.name, "router": config.router, "policy": config.policy, "load": run["load"],
                "offered_req_s": sim["request_rate"], "sent": run["sent"], "completed": run["completed"],
                "failed": run["failed"], "slo_met_fraction": sim["good_fraction"],
                "p50_ttft_ms": sim["p50_ttft_ms"], "p99_ttft_ms": sim["p99_ttft_ms"],
                "p50_tpot_ms": sim["p50_tpot_ms"], "p99_tpot_ms": sim["p99_tpot_ms"],
                "output_tokens_per_s": sim["output_tokens_per_s"],
                "steady_engine_tokens_per_s": sim["steady_engine_tokens_per_s"],
                "tokens_per_joule": run.get("engine_tokens_per_joule"),
                "client_tokens_per_joule": run.get("tokens_per_joule"),
                "idle_gpus": run["idle_gpus"]["count"], "gpus": run["idle_gpus"]["of"],
                "max_sim_lag_wall_s": run["max_lag_wall_s"],
                "machine_load_average_1m": run.get("machine_load_average_1m"),
            })
    table = with_goodput(table)
    return {
        "schema": "idlegrid-policy-compare/1",
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "simulated": True,
        "note": "Every number is from idlegrid's simulated engines: latency/throughput from a roofline model of "
                "each GPU, energy from its power model (modeled, not measured). Latencies and rates are in "
                "simulated time.",
        "settings": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(settings).items()},
            "fleet": str(Path(settings.fleet).relative_to(ROOT.parent)) if Path(settings.fleet).is_relative_to(ROOT.parent) else str(settings.fleet),
            "output_lengths": dataclasses.asdict(settings.output_lengths),
            "prompt_lengths": dataclasses.asdict(settings.prompt_lengths),
            "slo": {"ttft_ms": settings.slo_ttft_ms, "tpot_ms": settings.slo_tpot_ms, "clock": "simulated"},
        },
        "fleet": {
            "gateway_center": center,
            "model": model,
            "groups": [dataclasses.asdict(g) for g in fleet.groups],
            "rtt_ms_from_gateway": {g.center: fleet.rtt(center, g.center) for g in fleet.groups},
        },
        "capacity": capacity,
        "levels": [{"load": load, "rate_req_s": rate, "requests": len(reqs)} for load, rate, reqs in levels],
        "errors": {c.name: c.error for c in results if c.error},
        "table": table,
        "targets_at_80": targets(table),
    }


def with_goodput(table: list[dict]) -> list[dict]:
    """Goodput: the offered rate times the share of requests that met the SLO. Every
    configuration gets the same requests at the same times, so this compares like with
    like; dividing by each level's duration instead would let one slow straggler in
    the drain decide it."""
    for row in table:
        row["goodput_req_s"] = row["offered_req_s"] * row["slo_met_fraction"]
    return table


def targets(table: list[dict], load: float = 0.8) -> dict:
    """The issue's targets at 80% load, as ratios (None where a side is missing)."""
    at = {row["config"]: row for row in table if abs(row["load"] - load) < 1e-9}

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    pack, rr = at.get("idlegrid-slo_pack"), at.get("idlegrid-round_robin")
    routers = [row for name, row in at.items() if name.startswith("vllm-router-")]
    best_router = max(routers, key=lambda r: r["goodput_req_s"], default=None)
    return {
        "load": load,
        "slo_pack_vs_round_robin_goodput": ratio(pack and pack["goodput_req_s"], rr and rr["goodput_req_s"]),
        "target_vs_round_robin_goodput": 1.5,
        "best_vllm_router": best_router["config"] if best_router else None,
        "slo_pack_vs_best_vllm_router_goodput": ratio(pack and pack["goodput_req_s"], best_router and best_router["goodput_req_s"]),
        "target_vs_best_vllm_router_goodput": 1.2,
        "slo_pack_vs_round_robin_tokens_per_joule": ratio(pack and pack["tokens_per_joule"], rr and rr["tokens_per_joule"]),
        "target_vs_round_robin_tokens_per_joule": 1.2,
    }


def write_requests(folder: Path, records_by_load: dict[float, list[RequestRecord]], time_scale: float) -> None:
    """One line per request, in simulated ms (a compact requests.jsonl: no per-token gaps)."""
    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds * 1000 * time_scale, 2)

    with (folder / "requests.jsonl").open("w") as f:
        for load, records in records_by_load.items():
            for r in records:
                tpot = request_tpot(r)
                f.write(json.dumps({
                    "load": load, "index": r.index, "start_ms": ms(r.start_s), "worker": r.worker,
                    "ok": r.success, "error": r.error_kind, "prompt_tokens": r.prompt_tokens,
                    "output_tokens": r.output_tokens if r.success else None,
                    "ttft_ms": ms(r.ttft_s), "tpot_ms": ms(tpot), "e2el_ms": ms(r.e2el_s),
                }) + "\n")


def write_outputs(out: Path, summary: dict, results: list[ConfigResult], settings: Settings) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for config in results:
        folder = out / config.name
        folder.mkdir(exist_ok=True)
        write_requests(folder, config.records, settings.time_scale)
        write_results(folder, {
            "idlegrid_bench_schema": 1,
            "config": config.name, "router": config.router, "policy": config.policy, "error": config.error,
            "model_id": summary["fleet"]["model"], "served_model": {"simulated": True},
            "slo": settings.slo_wall(), "slo_simulated_ms": summary["settings"]["slo"],
            "time_scale": settings.time_scale, "runs": config.runs,
        })
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plots = plot_summary(out, summary)
    (out / "README.md").write_text(readme(summary, plots, out))


def _series(table: list[dict]) -> dict[str, list[dict]]:
    by_config: dict[str, list[dict]] = {}
    for row in table:
        by_config.setdefault(row["config"], []).append(row)
    return {k: sorted(v, key=lambda r: r["load"]) for k, v in by_config.items()}


def _style(config: str) -> dict:
    return {"linestyle": "--", "marker": "s"} if config.startswith("vllm-router") else {"linestyle": "-", "marker": "o"}


def plot_summary(out: Path, summary: dict) -> list[str]:
    series = _series(summary["table"])
    if not series:
        return []
    panels = [
        ("goodput_req_s", "goodput (req/s, simulated)", "Goodput at the SLO"),
        ("tokens_per_joule", "output tokens per joule (modeled)", "Tokens per joule"),
        ("p99_ttft_ms", "p99 TTFT (ms, simulated)", "p99 time to first token"),
        ("p99_tpot_ms", "p99 TPOT (ms, simulated)", "p99 time per output token"),
        ("steady_engine_tokens_per_s", "output tokens/s in steady window (simulated)", "Output throughput"),
        ("idle_gpus", "GPUs fully idle in steady window", "GPUs left idle (for training)"),
    ]
    fig = Figure(figsize=(15, 9), layout="constrained")
    axes = fig.subplots(2, 3).flatten()
    for ax, (key, ylabel, title) in zip(axes, panels):
        for config, rows in series.items():
            ax.plot([r["load"] * 100 for r in rows], [r[key] if r[key] is not None else math.nan for r in rows],
                    label=config, **_style(config))
        ax.set_xlabel("offered load (% of modeled fleet capacity)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if key in ("p99_ttft_ms",):
            ax.set_yscale("log")
        if key == "idle_gpus":
            ax.set_ylim(-0.3, max(r["gpus"] for r in summary["table"]) + 0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle("idlegrid policies vs vllm-router on a simulated 3-center fleet (SIMULATED; energy MODELED)")
    fig.savefig(out / "policies_vs_load.png", dpi=100)

    at = [r for r in summary["table"] if abs(r["load"] - 0.8) < 1e-9]
    names = []
    if at:
        fig = Figure(figsize=(13, 4), layout="constrained")
        left, right = fig.subplots(1, 2)
        names = [r["config"] for r in at]
        colors = ["tab:grey" if n.startswith("vllm-router") else "tab:blue" for n in names]
        left.barh(names, [r["goodput_req_s"] for r in at], color=colors)
        left.set_xlabel("goodput at 80% load (req/s, simulated)")
        right.barh(names, [r["tokens_per_joule"] or 0 for r in at], color=colors)
        right.set_xlabel("tokens per joule at 80% load (modeled)")
        for ax in (left, right):
            ax.grid(alpha=0.3, axis="x")
            ax.invert_yaxis()
        fig.savefig(out / "at_80_percent.png", dpi=100)
    return ["policies_vs_load.png"] + (["at_80_percent.png"] if names else [])


def readme(summary: dict, plots: Sequence[str], out: Path) -> str:
    s = summary["settings"]
    cap = summary["capacity"]
    fleet = summary["fleet"]
    t = summary["targets_at_80"]
    groups = ", ".join(f"{g['count']}× {g['gpu'].upper()} in `{g['center']}` (+{fleet['rtt_ms_from_gateway'][g['center']]:g} ms)"
                       for g in fleet["groups"])
    lengths = s["output_lengths"]
    prompts = f", median {R1_INPUT.median:g} words" if s.get("prompt_scale", 1) == 1 else (
        f": R1's lengths scaled by {s['prompt_scale']:g}, i.e. the R1 instruction and a word or so")
    if cap.get("prompt_tokens_mean"):
        prompts += f", {cap['prompt_tokens_mean']:.0f} tokens on average as the simulated engines count them"
    lines = [
        "# Routing policies vs vllm-router on a simulated three-center fleet",
        "",
        "> **Simulated.** Every number here comes from idlegrid's simulated engines (a roofline model of each GPU, "
        "calibrated to published measurements) and energy from its power model (**modeled**, not measured). "
        "Latencies and rates are in simulated time.",
        "",
        f"Made by `{summary.get('command', 'python -m benchmarks.policy_compare')}` on {summary['date']}.",
        "",
        "## Setup",
        "",
        f"- Fleet (`{s['fleet']}`): {groups}; gateway in `{fleet['gateway_center']}`; model `{fleet['model']}`; "
        f"max_num_seqs {s['max_num_seqs']}. Round trips are added to every engine response by the simulator.",
        f"- Workload: R1-style (short math prompts{prompts}; long-tailed reasoning outputs) "
        f"with output lengths log-normal, median {lengths['median']:g}, σ {lengths['sigma']:g}, clipped to "
        f"[{lengths['low']}, {lengths['high']}] tokens: the bench's `r1` distribution scaled by {s['output_scale']:g}. "
        "Open-loop Poisson arrivals, `max_tokens` = drawn length with `ignore_eos`. Prompts are random text (no shared prefixes).",
        f"- Capacity: {cap['method']}: {cap['output_tokens_per_s']:,.0f} output tokens/s = "
        f"{cap['requests_per_s']:.2f} req/s at {cap['output_tokens_mean']:.0f} mean output tokens. Per GPU: "
        + "; ".join(f"{g['gpu']} batch {g['batch']} ({g['limited_by']}), TPOT {g['tpot_ms']:.1f} ms, {g['tokens_per_s']:,.0f} tok/s"
                    for g in cap["per_gpu_group"]) + ".",
        f"- Loads: {', '.join(f'{x:.0%}' for x in s['loads'])} of capacity, {s['send_s']:g} simulated seconds of arrivals each "
        f"({', '.join(str(lv['requests']) for lv in summary['levels'])} requests).",
        f"- SLO for goodput: TTFT ≤ {s['slo']['ttft_ms']:g} ms and TPOT ≤ {s['slo']['tpot_ms']:g} ms (simulated time). "
        "Goodput = offered rate × share of requests that completed meeting both (every configuration gets the same "
        "requests at the same times). Failed requests (429 after the gateway's 30 s queue timeout, 503) count as missed.",
        f"- Time scale {s['time_scale']:g}: simulated time runs {s['time_scale']:g}× as fast as the wall clock, so "
        "wall-clock latencies are multiplied by it (and rates divided) to give simulated ones; the gateway's and "
        "client's own processing time is scaled the same way.",
        "- Steady window (the bench's): from when requests in flight first reach their time-weighted median to the "
        "last arrival. Output tok/s: tokens the engines generated in it per simulated second. Tokens/J: those tokens "
        "over the joules all engines' modeled energy counters grew by in it (idle GPUs included); the bench's "
        "client-side figure (tokens received in the window) is `client_tokens_per_joule` in summary.json. "
        "Idle GPUs: GPUs whose modeled power stayed at idle for the whole steady window.",
        "",
        "## Results",
        "",
        "| config | load | goodput req/s | SLO met | p50 / p99 TTFT ms | p50 / p99 TPOT ms | output tok/s | tokens/J (modeled) | idle GPUs | failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["table"]:
        lines.append(
            f"| {row['config']} | {row['load']:.0%} | {row['goodput_req_s']:.3f} | {row['slo_met_fraction']:.0%} | "
            f"{_f(row['p50_ttft_ms'], 0)} / {_f(row['p99_ttft_ms'], 0)} | {_f(row['p50_tpot_ms'], 1)} / {_f(row['p99_tpot_ms'], 1)} | "
            f"{_f(row['steady_engine_tokens_per_s'], 0)} | {_f(row['tokens_per_joule'], 2)} | {row['idle_gpus']}/{row['gpus']} | {row['failed']} |"
        )
    for name, error in summary["errors"].items():
        lines.append(f"| {name} | – | could not run: {error} | | | | | | | |")

    def r(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f}×"

    lines += [
        "",
        f"## Targets at {t['load']:.0%} load",
        "",
        "| target | wanted | reached |",
        "|---|---|---|",
        f"| slo_pack goodput vs round robin | ≥ {t['target_vs_round_robin_goodput']}× | {r(t['slo_pack_vs_round_robin_goodput'])} |",
        f"| slo_pack goodput vs best vllm-router policy ({t['best_vllm_router'] or 'none ran'}) | ≥ {t['target_vs_best_vllm_router_goodput']}× | {r(t['slo_pack_vs_best_vllm_router_goodput'])} |",
        f"| slo_pack tokens/J vs round robin | ≥ {t['target_vs_round_robin_tokens_per_joule']}× | {r(t['slo_pack_vs_round_robin_tokens_per_joule'])} |",
        "",
    ]
    placement = summary.get("full_scale_placement")
    if placement:
        lines += [
            "## Full-scale placement check (modeled, no serving)",
            "",
            f"The issue's full fleet (`{placement['fleet']}`: 4× H100 + 8× H20 + 4× 910B) at its real batch sizes is too "
            "big to serve through one Python gateway on this machine, so `python -m benchmarks.policy_compare "
            "--placement-check` asks each policy where it would put that fleet's load. " + placement["note"],
            "",
            "| load | policy | requests on GPUs over the TPOT SLO | idle GPUs | decode tok/s | power W | tokens/J (modeled) |",
            "|---|---|---|---|---|---|---|",
        ]
        for load, rows in placement["by_load"].items():
            for p in rows:
                lines.append(
                    f"| {float(load):.0%} | {p['policy']} | {p['requests_over_slo']} of {p['requests']} | "
                    f"{p['idle_gpus']} of {p['gpus']} | {p['tokens_per_s']:,.0f} | {p['power_w']:,.0f} | {p['tokens_per_joule']:.2f} |"
                )
        lines.append("")
    lines += ["## Plots", ""]
    lines += [f"![{p}]({p})" for p in plots]
    lines += ["", "Per-configuration details (every level's full bench summary, energy per worker and center, "
              "tokens per engine, simulation lag) are in `<config>/results.json`, one line per request (simulated ms) "
              "in `<config>/requests.jsonl`; the table above is `summary.json`.", ""]
    if summary.get("wall_s"):
        lines += [f"The run took {summary['wall_s'] / 60:.1f} minutes of wall time."]
    lines += [f"Largest simulation lag in any level: {max((row['max_sim_lag_wall_s'] for row in summary['table']), default=0):.2f} s "
              "(wall time an engine ran behind its time scale for lack of CPU; 0 means the simulated clock kept pace).", ""]
    if (out / "ANALYSIS.md").exists():
        lines += ["**What these numbers mean, what limits them, and what to change: [ANALYSIS.md](ANALYSIS.md).**", ""]
    return "\n".join(lines)


# --- where each policy puts a full-size fleet's load (no serving, the policies' own code) ----


def placement_check(fleet_file: Path, load: float = 0.8, policies: Sequence[str] = IDLEGRID_POLICIES,
                    max_num_seqs: int = 256, seed: int = 0) -> list[dict]:
    """Place a full-size fleet's requests with each policy,
    one by one through the gateway's own headroom check and policy code, and give each
    GPU's modeled TPOT at the batch it ends up holding.

    Requests are placed until the fleet's modeled decode rate reaches `load` times its
    capacity, so every policy delivers the same tokens/s and the comparison is at equal
    offered load. What the committed (scaled) run cannot show: at full scale (max_num_seqs 256, R1
    output lengths unscaled) whether a policy fills a GPU past the batch its TPOT SLO
    allows. A snapshot, not a serving run: no arrivals, departures or queueing."""
    from gateway.fleet import READY, RouteRequest, Worker
    from gateway.headroom import candidates
    from gateway.policies import make_policy

    fleet = load_fleet(fleet_file)
    settings = dataclasses.replace(FULL, fleet=fleet_file, output_scale=1.0, output_cap_medians=8.192,
                                   max_num_seqs=max_num_seqs)
    requests = r1_requests(20000, settings.output_lengths, seed, "placement")
    capacity = fleet_capacity(fleet, requests, settings)
    # Steady state at `load`: the fleet must decode load x capacity tokens/s (Little's law:
    # a placement that decodes each request more slowly needs more requests in flight).
    target_tokens_per_s = load * capacity["output_tokens_per_s"]
    concurrent = target_tokens_per_s
    center = fleet.groups[0].center
    rows = []
    for name in policies:
        workers, perf, held = [], {}, {}
        for group in fleet.groups:
            model = PerfModel(get_gpu(group.gpu), get_model(group.model))
            for i in range(group.count):
                w = Worker(id=f"{group.center}-{group.gpu}-{i}", center=group.center, model=group.model, engine_url="",
                           gpu=group.gpu, state=READY, max_num_seqs=max_num_seqs,
                           kv_capacity_tokens=model.kv_capacity_tokens, tpot_base_ms=model.tpot_base_ms,
                           tpot_ms_per_1k_kv=model.tpot_ms_per_1k_kv, tpot_ms_per_seq=model.tpot_ms_per_seq,
                           last_heartbeat=1e12)
                workers.append(w)
                perf[w.id], held[w.id] = model, []
        policy = make_policy(name, rng=random.Random(seed))
        placed = 0
        rate = {w.id: 0.0 for w in workers}  # modeled decode tokens/s of each GPU
        for r in requests:
            if sum(rate.values()) >= target_tokens_per_s:
                break
            route = RouteRequest(model=fleet.groups[0].model, prompt_tokens=r.input_len, max_output_tokens=r.output_len,
                                 prefix_key=r.messages[0]["content"][:2048], center=center)
            choice = policy.choose(route, candidates(workers, route, 1e12))
            if choice is None:
                break  # the fleet is full by the gateway's own headroom check
            # What the gateway's reservation (gateway.registry RESERVE) adds to the worker's record.
            choice.reserved_requests += 1
            choice.reserved_tokens += route.reserved_tokens
            choice.reserved_average_kv_tokens += route.average_kv_tokens
            held[choice.id].append(r.input_len + r.output_len / 2)  # KV a request holds on average over its life
            batch = len(held[choice.id])
            rate[choice.id] = batch / perf[choice.id].step_seconds(batch, int(sum(held[choice.id])), batch)
            placed += 1
        for w in workers:
            batch = len(held[w.id])
            tpot = perf[w.id].step_seconds(batch, int(sum(held[w.id])), batch) * 1000 if batch else None
            rows.append({"policy": name, "worker": w.id, "gpu": w.gpu, "batch": batch, "modeled_tpot_ms": tpot,
                         "tokens_per_s": batch / tpot * 1000 if tpot else 0.0,
                         "power_w": perf[w.id].power_watts(batch), "placed": placed, "concurrent": concurrent,
                         "load": load})
    return rows


FULL_SCALE_FLEET = ROOT / "fleets" / "three-centers.toml"


def full_scale_placement(loads: Sequence[float]) -> dict:
    """`placement_summary` of the issue's full 16-GPU fleet at each load (a few seconds)."""
    return {
        "fleet": str(FULL_SCALE_FLEET.relative_to(ROOT.parent)),
        "note": "No serving: each policy's own code places requests through the gateway's headroom check until the "
                "fleet's modeled decode rate reaches the load; TPOT, power and tokens/J are the simulator's model at "
                "the resulting batches. max_num_seqs 256, R1 output lengths unscaled.",
        "by_load": {f"{load:g}": placement_summary(placement_check(FULL_SCALE_FLEET, load=load)) for load in loads},
    }


def placement_summary(rows: list[dict], tpot_slo_ms: float = 60.0) -> list[dict]:
    """Per policy: requests on GPUs decoding slower than the SLO, idle GPUs, and the
    fleet's modeled decode tokens/s, power and tokens per joule at that placement."""
    out = []
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == policy]
        tokens = sum(r["tokens_per_s"] for r in mine if (r["modeled_tpot_ms"] or 0) <= tpot_slo_ms)
        watts = sum(r["power_w"] for r in mine)
        out.append({
            "policy": policy,
            "requests_over_slo": sum(r["batch"] for r in mine if (r["modeled_tpot_ms"] or 0) > tpot_slo_ms),
            "requests": sum(r["batch"] for r in mine),
            "idle_gpus": sum(r["batch"] == 0 for r in mine),
            "gpus": len(mine),
            "tokens_per_s_within_slo": tokens,
            "tokens_per_s": sum(r["tokens_per_s"] for r in mine),
            "power_w": watts,
            "tokens_per_joule": sum(r["tokens_per_s"] for r in mine) / watts,
        })
    return out


# --- command line ---------------------------------------------------------------------------


def settings_from_args(args: argparse.Namespace) -> Settings:
    settings = QUICK if args.quick else FULL
    changes = {}
    if args.fleet:
        changes["fleet"] = Path(args.fleet)
    if args.time_scale:
        changes["time_scale"] = args.time_scale
    if args.output_scale:
        changes["output_scale"] = args.output_scale
    if args.loads:
        changes["loads"] = tuple(float(x) for x in args.loads.split(","))
    if args.send_s:
        changes["send_s"] = args.send_s
    if args.max_num_seqs:
        changes["max_num_seqs"] = args.max_num_seqs
    if args.prompt_scale:
        changes["prompt_scale"] = args.prompt_scale
    if args.output_cap_medians:
        changes["output_cap_medians"] = args.output_cap_medians
    if args.policies is not None:
        changes["idlegrid_policies"] = tuple(p for p in args.policies.split(",") if p)
    if args.router_policies is not None:
        changes["router_policies"] = tuple(p for p in args.router_policies.split(",") if p)
    settings = dataclasses.replace(settings, **changes)
    unknown = [p for p in settings.idlegrid_policies if p not in POLICIES]
    if unknown:
        raise SystemExit(f"policy_compare: unknown idlegrid policy {unknown[0]!r}; choose from {', '.join(POLICIES)}")
    unknown = [p for p in settings.router_policies if p not in VLLM_ROUTER_POLICIES]
    if unknown:
        raise SystemExit(f"policy_compare: unknown vllm-router policy {unknown[0]!r}; choose from {', '.join(VLLM_ROUTER_POLICIES)}")
    return settings


async def _stoppable(work):
    """Run `work`; SIGINT or SIGTERM cancels it, so its clean-up (gateways, routers,
    engines, Redis) still runs."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.policy_compare", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 policies + 1 vllm-router policy, one load, shorter outputs")
    parser.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT.relative_to(ROOT.parent)}, or a temporary one with --quick)")
    parser.add_argument("--fleet", help="fleet TOML ([[workers]] center/gpu/model/count, [centers] round trips)")
    parser.add_argument("--time-scale", type=float, help="simulated seconds per wall second")
    parser.add_argument("--output-scale", type=float, help="multiply the R1 output-length distribution by this")
    parser.add_argument("--prompt-scale", type=float, help="multiply the R1 prompt-length distribution by this (default 1)")
    parser.add_argument("--loads", help="comma-separated fractions of capacity, e.g. 0.5,0.8,0.95")
    parser.add_argument("--send-s", type=float, help="simulated seconds of arrivals per load level")
    parser.add_argument("--max-num-seqs", type=int, help="every engine's max_num_seqs")
    parser.add_argument("--output-cap-medians", type=float, help="clip output lengths at this many medians")
    parser.add_argument("--redraw", action="store_true", help="only redraw README.md and the plots from OUT/summary.json")
    parser.add_argument("--placement-check", action="store_true",
                        help="no serving: show where each policy places a full-size fleet's load (--fleet, default "
                             "fleets/three-centers.toml) and each GPU's modeled TPOT there")
    parser.add_argument("--policies", help="idlegrid policies to run (comma-separated; empty for none)")
    parser.add_argument("--router-policies", help="vllm-router policies to run (comma-separated; empty for none)")
    args = parser.parse_args(argv)
    if args.placement_check:
        rows = placement_check(Path(args.fleet) if args.fleet else FULL_SCALE_FLEET,
                               load=float(args.loads.split(",")[0]) if args.loads else 0.8)
        print("policy            GPU    workers  batch (min-max)  modeled TPOT ms (max)  over the 60 ms SLO")
        by = {}
        for row in rows:
            by.setdefault((row["policy"], row["gpu"]), []).append(row)
        for (policy, gpu), group in by.items():
            batches = [r["batch"] for r in group]
            tpots = [r["modeled_tpot_ms"] or 0.0 for r in group]
            over = sum(r["batch"] for r in group if (r["modeled_tpot_ms"] or 0) > 60.0)
            print(f"{policy:<17} {gpu:<6} {len(group):>7}  {min(batches):>5}-{max(batches):<9} {max(tpots):>12.1f}"
                  f"          {over} requests")
        print(f"(requests placed until the fleet decodes {rows[0]['concurrent']:,.0f} tokens/s = {rows[0]['load']:.0%} of its modeled "
              "capacity at the SLO; R1 output lengths unscaled; max_num_seqs 256)")
        print()
        print("policy            on GPUs over SLO  idle GPUs  decode tok/s (within SLO)  power W  tokens/J (modeled)")
        for p in placement_summary(rows):
            print(f"{p['policy']:<17} {p['requests_over_slo']:>5} of {p['requests']:<6} {p['idle_gpus']:>3} of {p['gpus']:<4}"
                  f" {p['tokens_per_s']:>8,.0f} ({p['tokens_per_s_within_slo']:>7,.0f})    {p['power_w']:>6,.0f}   {p['tokens_per_joule']:.2f}")
        return 0
    if args.redraw:
        out = Path(args.out) if args.out else DEFAULT_OUT
        summary = json.loads((out / "summary.json").read_text())
        summary["table"] = with_goodput(summary["table"])
        summary["targets_at_80"] = targets(summary["table"])
        if "full_scale_placement" not in summary and summary["settings"].get("full_scale_placement", True):
            summary["full_scale_placement"] = full_scale_placement(summary["settings"]["loads"])
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "README.md").write_text(readme(summary, plot_summary(out, summary), out))
        print(f"redrew {out}/README.md and its plots")
        return 0
    settings = settings_from_args(args)
    command = shlex.join(["python", "-m", "benchmarks.policy_compare", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("idlegrid.worker").setLevel(logging.WARNING)
    if args.out:
        out = Path(args.out)
    elif args.quick:
        out = Path(tempfile.mkdtemp(prefix="policy-compare-quick-"))
    else:
        out = DEFAULT_OUT
    with tempfile.TemporaryDirectory(prefix="policy-compare-") as work:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        try:
            summary = runner(_stoppable(compare(settings, out, Path(work), command)))
        except (asyncio.CancelledError, KeyboardInterrupt):
            print("policy_compare: stopped; everything it started has been stopped too", file=sys.stderr)
            return 130
    t = summary["targets_at_80"]
    print(f"results in {out}/ (README.md, summary.json, plots); targets at 80%: "
          f"slo_pack/round_robin goodput {_f(t['slo_pack_vs_round_robin_goodput'], 2)}, "
          f"slo_pack/best vllm-router goodput {_f(t['slo_pack_vs_best_vllm_router_goodput'], 2)}, "
          f"slo_pack/round_robin tokens/J {_f(t['slo_pack_vs_round_robin_tokens_per_joule'], 2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
