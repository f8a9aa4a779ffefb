"""`idlegrid worker`: the agent an operator runs beside one GPU.

It starts an engine (vLLM, the simulated one, or the torch engine: a random-weight
model doing real work on a real GPU) in a process group of its own,
or attaches to one already running, waits until the engine is healthy, enrolls
with a gateway using a one-time token, and then heartbeats every second with
the load it scrapes from the engine's `/metrics` and the GPU's energy counter.
Workers never see Redis: everything goes through the gateway's control API.

The GPU is borrowed from training, and the agent gives it back on any reclaim
signal: the gateway's `drain` command (`idlegrid admin drain`), a reclaim
command or file, or NVML showing a process that is not the engine (see
`workers.reclaim`). A small state machine does it, one log line per step:

    ready ──signal──▶ draining ──abort, sleep──▶ sleeping ──clear──▶ waking ──▶ ready

Draining tells the gateway at once (it stops placing work here) and pauses the
engine with `mode=abort`: in-flight streams end with their partial output and
the gateway resumes each on another worker. Then the engine sleeps (or stops),
freeing GPU memory. When every signal has been clear for --wake-after seconds,
or on the gateway's `wake` command, the engine wakes, answers a one-token
completion, and the worker is ready again. A drain by an operator is only
undone by `wake`.

On SIGTERM or SIGINT it reports "draining", hands in-flight requests over the
same way (or, with --no-handover, lets them finish within --drain-timeout),
deregisters and stops the engine. A second signal skips the wait.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import socket
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import httpx

from workers import nvml
from workers.engine_metrics import EngineMetrics, parse_metrics
from workers.engine_process import EngineFailed, EngineProcess, wait_until_healthy
from workers.reclaim import ReclaimWatch, gpu_memory_used

log = logging.getLogger("idlegrid.worker")

# The agent's states. "waking" is the agent's own: gateways know only
# starting/ready/draining/sleeping and keep a waking worker as sleeping.
READY = "ready"
DRAINING = "draining"
SLEEPING = "sleeping"
WAKING = "waking"

# Seconds an engine gets to sleep or wake: level 1 copies the weights to or from
# host memory (tens of GB for a large model), level 2 reloads them.
LIFECYCLE_TIMEOUT_S = 300.0

# An engine put to sleep or paused by someone else (its /sleep or /pause called
# directly, say by a training job's script taking the GPU back) holds every request
# sent to it without a word. A serving worker's engine is asked this often.
OUTSIDE_SLEEP_CHECK_S = 1.0

# How often a worker started with --stop-with-parent looks for its parent.
PARENT_CHECK_S = 0.5

# Time an engine gets to answer /health after it is launched: vLLM loads weights
# and profiles memory (minutes on a big model); the simulated engine is instant; the
# torch engine starts CUDA and draws its random weights (seconds to a minute).
DEFAULT_START_TIMEOUT = {"vllm": 1800.0, "sim": 60.0, "torch": 600.0, "external": 60.0}


class AgentError(Exception):
    """A failure the operator must act on; its message is the one line we print."""


class Revoked(AgentError):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway", required=True, metavar="URL", help="gateway base URL, e.g. http://gw:8000")
    parser.add_argument(
        "--token",
        default=os.environ.get("IDLEGRID_ENROLL_TOKEN"),
        metavar="ENROLL_TOKEN",
        help="enrollment token from `idlegrid admin create-enroll-token` (default: $IDLEGRID_ENROLL_TOKEN)",
    )
    parser.add_argument("--center", required=True, help="the computing center this GPU is in")
    engine = parser.add_argument_group("engine (choose --engine or --engine-url)")
    engine.add_argument("--engine", choices=["vllm", "sim", "torch"],
                        help="launch a vLLM, a simulated, or a torch engine (random weights, real GPU work)")
    engine.add_argument("--engine-url", metavar="URL", help="attach to an engine that is already running")
    engine.add_argument("--engine-api-key", metavar="KEY", help="API key of the --engine-url engine")
    engine.add_argument("--model", help="model to serve (vllm: a path or hub id; sim: a model profile id; torch: a config, e.g. 8b)")
    engine.add_argument("--gpu", help="GPU profile (sim, required) or GPU name to report (default: from NVML)")
    engine.add_argument("--gpu-index", metavar="GPUS",
                        help="NVML indices or UUIDs of the engine's GPUs to meter, comma-separated (default: as many "
                             "as vLLM's --tensor-parallel-size x --pipeline-parallel-size, from the first of "
                             "CUDA_VISIBLE_DEVICES, else of the machine)")
    engine.add_argument("--time-scale", type=float, help="sim: simulated seconds per wall-clock second")
    engine.add_argument("--seed", type=int, help="sim: seed of the deterministic output; torch: seed of the weights")
    engine.add_argument("--extra-latency-ms", type=float, help="sim: round trip added to every response, to emulate a distant center")
    engine.add_argument("--max-num-seqs", type=int, help="most sequences the engine runs at once")
    engine.add_argument("--host", default="127.0.0.1", help="address the launched engine listens on (default 127.0.0.1)")
    engine.add_argument("--advertise-host", help="host gateways use to reach the engine (default: --host, or this machine's name if --host is 0.0.0.0)")
    engine.add_argument("--engine-port", type=int, help="port of the launched engine (default: a free one)")
    engine.add_argument("--engine-start-timeout", type=float, metavar="S", help="seconds to wait for engine /health (default: vllm 1800, sim 60, torch 600)")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0, metavar="S", help="seconds between heartbeats (default 1.0)")
    parser.add_argument("--drain-timeout", type=float, default=30.0, metavar="S", help="with --no-handover: seconds in-flight requests get to finish on shutdown (default 30)")
    parser.add_argument("--stop-with-parent", action="store_true",
                        help="stop (without waiting for in-flight requests) when the process that started this agent "
                             "exits, however it exits: `idlegrid up` starts its workers so")
    parser.add_argument("--handover", action=argparse.BooleanOptionalAction, default=True,
                        help="on SIGTERM, end in-flight requests at once (the gateway resumes them on other workers) "
                             "instead of waiting for them (default: on)")
    reclaim = parser.add_argument_group("reclaim (training takes the GPU back)")
    reclaim.add_argument("--reclaim-command", metavar="CMD", help="shell command run every --reclaim-interval seconds; exit status 0 = training wants this GPU")
    reclaim.add_argument("--reclaim-file", metavar="PATH", type=Path, help="while this file exists, training wants this GPU")
    reclaim.add_argument("--reclaim-nvml", action=argparse.BooleanOptionalAction, default=None,
                         help="reclaim when NVML shows a compute process on the GPU that is not the engine's "
                              "(default: on for --engine vllm)")
    reclaim.add_argument("--reclaim-interval", type=float, default=2.0, metavar="S", help="seconds between reclaim checks (default 2)")
    reclaim.add_argument("--wake-after", type=float, default=5.0, metavar="S", help="seconds every reclaim signal must be clear before the engine wakes (default 5)")
    reclaim.add_argument("--on-reclaim", choices=["sleep", "stop"], default="sleep", help="free the GPU by sleeping the engine (default) or stopping it")
    reclaim.add_argument("--sleep-level", type=int, choices=[1, 2], default=1, help="vLLM sleep level: 1 moves weights to host memory, 2 drops them (default 1)")
    parser.add_argument("engine_args", nargs="*", metavar="-- ENGINE_ARGS",
                        help="extra arguments for vLLM or the torch engine (e.g. --device cpu), after --")


def _check_arguments(args: argparse.Namespace) -> None:
    """Combinations argparse cannot express; raises AgentError with one line."""
    if not args.token:
        raise AgentError("--token is required (or set IDLEGRID_ENROLL_TOKEN)")
    if not args.gateway.startswith(("http://", "https://")):
        raise AgentError(f"--gateway must be an http(s) URL, got {args.gateway!r}")
    if bool(args.engine) == bool(args.engine_url):
        raise AgentError("give exactly one of --engine vllm|sim|torch or --engine-url URL")
    if args.engine_url and not args.engine_url.startswith(("http://", "https://")):
        raise AgentError(f"--engine-url must be an http(s) URL, got {args.engine_url!r}")
    if args.engine_api_key and not args.engine_url:
        raise AgentError("--engine-api-key is for --engine-url; launched engines get a fresh key of their own")
    if args.engine and not args.model:
        raise AgentError(f"--engine {args.engine} needs --model")
    if args.engine == "sim" and not args.gpu:
        raise AgentError("--engine sim needs --gpu (a GPU profile such as h100)")
    if args.engine != "sim" and (args.time_scale is not None or args.extra_latency_ms is not None):
        raise AgentError("--time-scale and --extra-latency-ms only apply to --engine sim")
    if args.engine not in ("sim", "torch") and args.seed is not None:
        raise AgentError("--seed only applies to --engine sim or torch")
    if args.engine_args and args.engine not in ("vllm", "torch"):
        raise AgentError(f"extra engine arguments {' '.join(args.engine_args)!r} only apply to --engine vllm or torch")
    if args.heartbeat_interval <= 0 or args.heartbeat_interval > 1.0:
        raise AgentError("--heartbeat-interval must be more than 0 and at most 1 second")
    if args.drain_timeout < 0:
        raise AgentError("--drain-timeout must not be negative")
    if args.reclaim_interval <= 0:
        raise AgentError("--reclaim-interval must be more than 0")
    if args.wake_after < 0:
        raise AgentError("--wake-after must not be negative")
    if args.engine_url and args.on_reclaim == "stop":
        raise AgentError("--on-reclaim stop needs an engine the agent launches (--engine), not --engine-url")
    if args.engine_url and args.reclaim_nvml:
        raise AgentError("--reclaim-nvml needs an engine the agent launches (--engine): it cannot tell an attached engine's processes from training's")


def _free_port(host: str) -> int:
    bind_host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    with socket.socket(socket.AF_INET6 if ":" in bind_host else socket.AF_INET) as s:
        s.bind((bind_host, 0))
        return s.getsockname()[1]


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _engine_flag_value(engine_args: list[str], flag: str) -> str | None:
    """The value of `flag` in vLLM arguments, given as `--flag V` or `--flag=V`."""
    for i, arg in enumerate(engine_args):
        if arg == flag and i + 1 < len(engine_args):
            return engine_args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def engine_gpu_count(args: argparse.Namespace) -> int:
    """GPUs one vLLM engine uses: tensor x pipeline parallel size (1 for the others)."""
    engine_args = getattr(args, "engine_args", None) or []
    count = 1
    for long, short in (("--tensor-parallel-size", "-tp"), ("--pipeline-parallel-size", "-pp")):
        value = _engine_flag_value(engine_args, long) or _engine_flag_value(engine_args, short)
        count *= int(value) if value and value.isdigit() else 1
    return count


@dataclass
class EngineSpec:
    """How to reach the engine, and how to launch it if we own it."""

    kind: str  # vllm | sim | external
    url: str
    api_key: str
    argv: list[str] | None = None
    env: dict[str, str] | None = None
    max_num_seqs: int | None = None


def engine_spec(args: argparse.Namespace) -> EngineSpec:
    if args.engine_url:
        return EngineSpec("external", args.engine_url.rstrip("/"), args.engine_api_key or "", max_num_seqs=args.max_num_seqs)
    # A fresh key per engine: only gateways (which learn it at enrollment) can call it.
    api_key = "eng-" + secrets.token_urlsafe(24)
    port = args.engine_port or _free_port(args.host)
    advertise = args.advertise_host or (socket.getfqdn() if args.host in ("0.0.0.0", "::", "") else args.host)
    url = f"http://{_url_host(advertise)}:{port}"
    if args.engine == "sim":
        argv = [sys.executable, "-m", "gateway.cli", "sim-engine", "--host", args.host, "--port", str(port),
                "--gpu", args.gpu, "--model", args.model, "--api-key", api_key]
        if args.time_scale is not None:
            argv += ["--time-scale", str(args.time_scale)]
        if args.seed is not None:
            argv += ["--seed", str(args.seed)]
        if args.max_num_seqs is not None:
            argv += ["--max-num-seqs", str(args.max_num_seqs)]
        if args.extra_latency_ms:
            argv += ["--extra-latency-ms", str(args.extra_latency_ms)]
        return EngineSpec("sim", url, api_key, argv=argv, env=None, max_num_seqs=args.max_num_seqs)
    if args.engine == "torch":
        # The engine inherits CUDA_VISIBLE_DEVICES, so it runs on the GPU the agent meters.
        argv = [sys.executable, "-m", "workers.torch_engine", "--host", args.host, "--port", str(port),
                "--config", args.model, "--api-key", api_key]
        if args.seed is not None:
            argv += ["--seed", str(args.seed)]
        max_num_seqs = args.max_num_seqs or 64  # the engine's default, said aloud so the gateway knows it
        argv += ["--max-num-seqs", str(max_num_seqs), *args.engine_args]
        return EngineSpec("torch", url, api_key, argv=argv, env=None, max_num_seqs=max_num_seqs)
    from workers.vllm_launch import vllm_command, vllm_missing_reason

    missing = vllm_missing_reason()
    if missing:
        raise AgentError(f"--engine vllm: {missing}")
    extra = list(args.engine_args)
    max_num_seqs = args.max_num_seqs
    given = _engine_flag_value(extra, "--max-num-seqs")
    if given is not None:
        if not given.isdigit():
            raise AgentError(f"vLLM's --max-num-seqs must be a number, got {given!r}")
        max_num_seqs = int(given)
    elif max_num_seqs is not None:
        extra += ["--max-num-seqs", str(max_num_seqs)]
    argv, env_additions = vllm_command(args.model, args.host, port, api_key, extra)
    env = {**os.environ, **env_additions}
    return EngineSpec("vllm", url, api_key, argv=argv, env=env, max_num_seqs=max_num_seqs)


def _problem(exc: Exception) -> str:
    """An exception as a short phrase; some httpx errors have an empty message."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _error_text(response: httpx.Response) -> str:
    """The message of an OpenAI-shaped error body, else the start of the body."""
    try:
        return str(response.json()["error"]["message"])
    except Exception:
        return response.text[:200] or response.reason_phrase


class Agent:
    def __init__(self, args: argparse.Namespace, spec: EngineSpec):
        self.args = args
        self.spec = spec
        self.gateway = args.gateway.rstrip("/")
        self.engine: EngineProcess | None = None
        # What we did to the engine on reclaim, so waking undoes exactly that.
        self.engine_paused = False
        self.engine_asleep = False
        self.engine_stopped = False  # stopped by us (--on-reclaim stop), not crashed
        self.slept_outside = False  # asleep or paused by someone else, found so while serving
        self.next_outside_check = 0.0
        self.model: str | None = None
        self.stop_requested = asyncio.Event()
        self._poke = asyncio.Event()  # something happened: the state machine looks again
        self.hurry = False  # a second signal: skip the drain wait
        self.state = READY
        self.worker_id: str | None = None
        self.credential: str | None = None
        self.heartbeat_interval = args.heartbeat_interval
        self.energy_reader: nvml.GpuEnergyReader | None = None
        self.gpus = nvml.parse_gpus(args.gpu_index) if args.gpu_index else nvml.visible_gpus(engine_gpu_count(args))
        self.watch: ReclaimWatch | None = None
        self._metrics_failing = False
        # What the heartbeat loop learned, for the state machine.
        self.metrics: EngineMetrics | None = None
        self.metrics_at = 0.0
        self.reported_state: str | None = None  # the state the gateway last accepted a heartbeat with
        self.draining_acked_at: float | None = None
        self.gateway_down_since: float | None = None
        self._beat_now = asyncio.Event()
        self._beat_sent = asyncio.Event()
        # Reclaim bookkeeping, reported in heartbeats.
        self.operator_drained = False  # by `idlegrid admin drain`: only `wake` undoes it
        self.operator_drained_at: float | None = None
        self.wake_requested = False
        self.wake_retry_at = 0.0
        self.reclaim_reason: str | None = None
        self.reclaim_seconds: float | None = None
        self.wake_seconds: float | None = None
        headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
        self.engine_http = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(5.0, connect=2.0))
        self.gateway_http = httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0))

    # -- signals ---------------------------------------------------------

    def on_signal(self, signum: int) -> None:
        if self.stop_requested.is_set():
            log.warning("%s again: stopping without waiting for in-flight requests", signal.Signals(signum).name)
            self.hurry = True
        else:
            log.info("%s received: draining", signal.Signals(signum).name)
        self.stop_requested.set()
        self._poke.set()

    # -- engine ------------------------------------------------------------

    def start_engine(self) -> None:
        if self.spec.argv is None:
            return
        self.engine = EngineProcess(self.spec.argv, self.spec.env, name=f"{self.spec.kind} engine").start()

    def engine_exited(self) -> int | None:
        return self.engine.exit_code() if self.engine else None

    async def describe_engine(self) -> dict:
        """What enrollment needs to know: served model, capacity, speed profile."""
        try:
            return await self._describe_engine()
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise AgentError(f"engine at {self.spec.url} did not describe itself: {_problem(exc)}") from None

    async def _describe_engine(self) -> dict:
        response = await self.engine_http.get(f"{self.spec.url}/v1/models")
        if response.status_code != 200:
            raise AgentError(f"engine {self.spec.url}/v1/models answered {response.status_code}: {_error_text(response)}")
        served = [m["id"] for m in response.json().get("data", [])]
        if not served:
            raise AgentError(f"engine at {self.spec.url} serves no model")
        if self.args.model in served:
            model = self.args.model
        elif self.spec.kind == "external" and self.args.model:
            raise AgentError(f"engine at {self.spec.url} serves {', '.join(served)}, not {self.args.model}")
        else:
            model = served[0]  # vLLM names the model by its path unless --served-model-name says otherwise

        info = {
            "model": model,
            "max_num_seqs": self.spec.max_num_seqs,
            "kv_capacity_tokens": None,
            "tpot_base_ms": None,
            "tpot_ms_per_1k_kv": None,
            "tpot_ms_per_seq": None,
            "time_scale": 1.0,
        }
        metrics = await self.scrape()
        if metrics is not None and metrics.kv_capacity_tokens:
            info["kv_capacity_tokens"] = metrics.kv_capacity_tokens
        if self.spec.kind == "sim":
            response = await self.engine_http.get(f"{self.spec.url}/v1/sim/info")
            response.raise_for_status()
            sim = response.json()
            for field in ("max_num_seqs", "kv_capacity_tokens", "tpot_base_ms", "tpot_ms_per_1k_kv", "tpot_ms_per_seq", "time_scale"):
                if sim.get(field) is not None:
                    info[field] = sim[field]
        return info

    async def scrape(self) -> EngineMetrics | None:
        """The engine's load now, or None if it cannot be read."""
        try:
            response = await self.engine_http.get(f"{self.spec.url}/metrics", timeout=2.0)
            response.raise_for_status()
            metrics = parse_metrics(response.text)
        except (httpx.HTTPError, ValueError) as exc:
            if not self._metrics_failing:
                log.warning("cannot read engine metrics at %s/metrics (%s); no heartbeats until it answers",
                            self.spec.url, _problem(exc))
            self._metrics_failing = True
            return None
        if self._metrics_failing:
            log.info("engine metrics readable again")
            self._metrics_failing = False
        return metrics

    def energy(self, metrics: EngineMetrics) -> tuple[float | None, float | None, str | None]:
        """(power W, energy J, source): the GPU's meter, the simulator's model, or unknown."""
        if self.energy_reader is not None:
            try:
                return self.energy_reader.power_w(), self.energy_reader.energy_j(), "nvml"
            except nvml.pynvml.NVMLError as exc:
                log.warning("NVML read failed: %s", exc)
                return None, None, None
        if self.spec.kind == "sim" and metrics.energy_j is not None:
            return metrics.power_w, metrics.energy_j, "modeled"
        return None, None, None

    # -- control API -------------------------------------------------------

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credential}"}

    async def enroll(self, info: dict) -> bool:
        """Enroll, retrying while the gateway is unreachable; False if stopped first."""
        gpu = self.args.gpu or (self.energy_reader.name if self.energy_reader else "unknown")
        body = {
            "token": self.args.token,
            "center": self.args.center,
            "gpu": gpu,
            "model": info["model"],
            "engine_url": self.spec.url,
            "engine_api_key": self.spec.api_key,
            "engine_kind": self.spec.kind,
            "engine_pid": self.engine.pid if self.engine else None,
            "tpot_base_ms": info["tpot_base_ms"],
            "tpot_ms_per_1k_kv": info["tpot_ms_per_1k_kv"],
            "tpot_ms_per_seq": info["tpot_ms_per_seq"],
            "time_scale": info["time_scale"],
        }
        # Capacity we could not learn is left out: the gateway then assumes its defaults.
        for field in ("max_num_seqs", "kv_capacity_tokens"):
            if info[field] is not None:
                body[field] = int(info[field])
        delay = 0.5
        while not self.stop_requested.is_set():
            problem = None
            try:
                response = await self.gateway_http.post(f"{self.gateway}/control/enroll", json=body)
            except httpx.HTTPError as exc:
                problem = f"gateway {self.gateway} unreachable ({_problem(exc)})"
            else:
                if response.status_code == 200:
                    try:
                        reply = response.json()
                        self.worker_id, self.credential = reply["worker_id"], reply["credential"]
                    except (ValueError, KeyError, TypeError):
                        raise AgentError(f"{self.gateway}/control/enroll answered 200 but not with a worker id "
                                         f"and credential; is that an idlegrid gateway?") from None
                    gateway_interval = reply.get("heartbeat_interval_s")
                    if gateway_interval:
                        self.heartbeat_interval = min(self.heartbeat_interval, float(gateway_interval))
                    log.info("enrolled as worker %s in center %s: %s on %s, engine %s",
                             self.worker_id, self.args.center, info["model"], gpu, self.spec.url)
                    return True
                if response.status_code < 500 and response.status_code != 429:
                    raise AgentError(f"enrollment refused by {self.gateway} ({response.status_code}): {_error_text(response)}")
                problem = f"gateway {self.gateway} answered {response.status_code}: {_error_text(response)}"
            log.warning("cannot enroll: %s; retrying in %.1fs", problem, delay)
            await self._nap(delay)
            delay = min(delay * 2, 10.0)
        return False

    async def heartbeat(self, metrics: EngineMetrics, state: str) -> str | None:
        """Send one heartbeat; returns the gateway's command. Raises Revoked on 401/403,
        httpx.HTTPError (or AgentError for a 5xx) when the gateway cannot be reached."""
        power_w, energy_j, source = self.energy(metrics)
        body = {
            "state": state,
            "running": metrics.running,
            "waiting": metrics.waiting,
            "kv_usage": metrics.kv_usage,
            "power_w": power_w,
            "energy_j": energy_j,
            "energy_source": source,
        }
        # The last reclaim, once there has been one: why, signal to GPU memory
        # freed, and wake to serving, in seconds.
        for field in ("reclaim_reason", "reclaim_seconds", "wake_seconds"):
            if getattr(self, field) is not None:
                body[field] = getattr(self, field)
        response = await self.gateway_http.post(f"{self.gateway}/control/heartbeat", json=body, headers=self._auth())
        if response.status_code in (401, 403):
            raise Revoked(f"worker {self.worker_id} was revoked by the gateway: {_error_text(response)}")
        if response.status_code != 200:
            raise AgentError(f"heartbeat answered {response.status_code}: {_error_text(response)}")
        try:
            return response.json().get("command")
        except (ValueError, AttributeError):
            raise AgentError(f"heartbeat answered 200 with a body that is not a JSON object: {response.text[:100]!r}") from None

    async def deregister(self) -> None:
        try:
            response = await self.gateway_http.post(f"{self.gateway}/control/deregister", headers=self._auth(), timeout=5.0)
        except httpx.HTTPError as exc:
            log.warning("could not deregister from %s (%s); the gateway will see the worker go silent", self.gateway, _problem(exc))
            return
        if response.status_code == 200:
            log.info("deregistered worker %s", self.worker_id)
        else:
            log.warning("deregister answered %s: %s", response.status_code, _error_text(response))

    # -- main loop ---------------------------------------------------------

    async def _nap(self, seconds: float) -> None:
        """Sleep, but wake at once when a signal, command or stop arrives."""
        try:
            await asyncio.wait_for(self._poke.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass
        self._poke.clear()

    def set_state(self, state: str, why: str) -> None:
        """One transition of the state machine: logged, and told to gateways at once."""
        if state == self.state:
            return
        log.info("%s -> %s: %s", self.state, state, why)
        self.state = state
        self._beat_now.set()

    # -- heartbeats (a task of their own, so a slow sleep or wake never stops them) --

    async def heartbeats(self) -> None:
        """Heartbeat every interval, or at once after a state change. Raises Revoked,
        or EngineFailed if the engine dies without us stopping it."""
        retry_delay = self.heartbeat_interval
        while True:
            tick = time.monotonic()
            if not self.engine_stopped and self.engine_exited() is not None:
                raise EngineFailed(f"{self.engine.name} exited unexpectedly with code {self.engine_exited()}")
            # A stopped engine has no load to report; the worker still heartbeats so
            # gateways keep it as "sleeping" rather than gone.
            metrics = EngineMetrics() if self.engine_stopped else await self.scrape()
            self.metrics, self.metrics_at = metrics, tick
            if metrics is not None:
                # An engine we cannot read gets no heartbeat, so gateways stop routing to it.
                state = self.state
                try:
                    command = await self.heartbeat(metrics, state)
                except Revoked:
                    raise
                except (httpx.HTTPError, AgentError) as exc:
                    if self.gateway_down_since is None:
                        self.gateway_down_since = tick
                        log.warning("gateway %s unreachable (%s); engine keeps running, retrying", self.gateway, _problem(exc))
                    retry_delay = min(retry_delay * 2, 5.0)
                else:
                    if self.gateway_down_since is not None:
                        log.info("gateway %s reachable again after %.0fs", self.gateway, tick - self.gateway_down_since)
                        self.gateway_down_since = None
                    retry_delay = self.heartbeat_interval
                    if state == DRAINING and self.reported_state != DRAINING:
                        self.draining_acked_at = time.monotonic()
                    self.reported_state = state
                    self._beat_sent.set()
                    self.on_command(command)
            delay = retry_delay if self.gateway_down_since is not None else self.heartbeat_interval
            try:
                await asyncio.wait_for(self._beat_now.wait(), timeout=max(0.0, delay - (time.monotonic() - tick)))
            except asyncio.TimeoutError:
                pass
            self._beat_now.clear()

    def on_command(self, command: str | None) -> None:
        """Note what the gateway asked for in its heartbeat reply; the state machine acts."""
        if not command:
            return
        if command == "drain":
            log.info("gateway asked to drain (an operator's `admin drain`)")
            self.operator_drained, self.operator_drained_at = True, time.monotonic()
        elif command == "wake":
            log.info("gateway asked to wake (an operator's `admin wake`)")
            self.operator_drained = False
            self.wake_requested = self.state != READY
        elif command == "stop":
            log.info("gateway asked to stop")
            self.stop_requested.set()
        else:
            log.warning("ignoring unknown gateway command %r", command)
            return
        self._poke.set()

    async def gateway_told(self, state: str, timeout: float) -> bool:
        """Wait until a heartbeat reporting `state` has been accepted by the gateway."""
        deadline = time.monotonic() + timeout
        while self.reported_state != state:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._beat_sent.clear()
            try:
                await asyncio.wait_for(self._beat_sent.wait(), timeout=remaining)
            except asyncio.TimeoutError:
                return False
        return True

    # -- the engine's lifecycle --------------------------------------------

    async def engine_call(self, path: str, params: dict | None = None, json: dict | None = None,
                          timeout: float = 10.0) -> httpx.Response:
        """POST to one of the engine's lifecycle endpoints; AgentError unless it answers 200."""
        try:
            response = await self.engine_http.post(f"{self.spec.url}{path}", params=params, json=json, timeout=timeout)
        except httpx.HTTPError as exc:
            raise AgentError(f"engine {path} failed: {_problem(exc)}") from None
        if response.status_code != 200:
            raise AgentError(f"engine {path} answered {response.status_code}: {_error_text(response)}")
        return response

    async def hand_over(self) -> int:
        """End every request on the engine now, with its partial output: the gateway
        resumes each on another worker. Returns how many there were."""
        metrics = await self.scrape()  # fresh: the last heartbeat's count may be a second old
        in_flight = metrics.in_flight if metrics else 0
        try:
            await self.engine_call("/pause", {"mode": "abort"})
        except AgentError as exc:
            log.warning("could not hand in-flight requests over: %s", exc)
            return 0
        self.engine_paused = True
        if in_flight:
            log.info("handed over %d in-flight request(s): the engine ended them with their partial output "
                     "and gateways resume them elsewhere", in_flight)
        else:
            log.info("paused the engine: no requests in flight")
        return in_flight

    def gpu_memory(self) -> int | None:
        """GPU memory in use, where NVML can tell (a simulated engine uses none)."""
        return gpu_memory_used(self.gpus) if self.spec.kind != "sim" else None

    async def free_gpu(self) -> str:
        """Sleep or stop the engine so its GPU memory is free; returns what was done."""
        used_before = await asyncio.to_thread(self.gpu_memory)
        if self.args.on_reclaim == "sleep":
            try:
                await self.engine_call("/sleep", {"level": self.args.sleep_level}, timeout=LIFECYCLE_TIMEOUT_S)
                self.engine_asleep = True
                done = f"engine asleep at level {self.args.sleep_level}"
            except AgentError as exc:
                if self.engine is None:
                    log.error("cannot free the GPU: %s (and the engine is not ours to stop)", exc)
                    return "engine could not sleep"
                log.warning("%s; stopping the engine instead", exc)
                await self.stop_engine()
                done = "engine stopped (it could not sleep)"
        else:
            await self.stop_engine()
            done = "engine stopped"
        used_after = await asyncio.to_thread(self.gpu_memory)
        if used_before is not None and used_after is not None:
            done += f", GPU memory in use {used_before / 2**30:.1f} -> {used_after / 2**30:.1f} GiB"
        return done

    async def stop_engine(self) -> None:
        self.engine_stopped = True  # first: the heartbeat loop must not take this for a crash
        await asyncio.to_thread(self.engine.stop)
        self.engine_paused = self.engine_asleep = False

    async def leave_attached_engine(self) -> None:
        """An engine we attached to is not ours: undo a handover's pause on the way
        out. One put to sleep for training stays asleep: the GPU is training's."""
        if self.engine is not None:
            return
        if self.engine_asleep:
            log.info("leaving the engine at %s asleep (the GPU was reclaimed); POST /wake_up wakes it", self.spec.url)
        elif self.engine_paused:
            try:
                await self.engine_call("/resume")
            except AgentError as exc:
                log.warning("could not resume the engine at %s: %s", self.spec.url, exc)

    async def restart_engine(self) -> None:
        self.start_engine()
        timeout = self.args.engine_start_timeout or DEFAULT_START_TIMEOUT[self.spec.kind]
        try:
            if not await wait_until_healthy(self.engine_http, self.spec.url, timeout, self.engine, self.stop_requested):
                raise AgentError("stopped while the engine was starting")
        except (EngineFailed, AgentError):
            await asyncio.to_thread(self.engine.stop)
            raise
        self.engine_stopped = False

    async def wake_engine(self) -> None:
        if self.args.sleep_level == 2:
            # Level 2 dropped the weights: vLLM wants them reallocated, reloaded, and
            # only then the KV cache back (waking both at once serves garbage).
            await self.engine_call("/wake_up", {"tags": "weights"}, timeout=LIFECYCLE_TIMEOUT_S)
            try:
                await self.engine_call("/collective_rpc", json={"method": "reload_weights"}, timeout=LIFECYCLE_TIMEOUT_S)
            except AgentError as exc:
                if self.spec.kind not in ("sim", "torch"):  # no weights to reload; the torch engine rebuilds its own
                    log.warning("could not reload weights after sleep level 2: %s", exc)
        await self.engine_call("/wake_up", timeout=LIFECYCLE_TIMEOUT_S)

    async def engine_asleep_or_paused(self) -> bool:
        """What the engine's /is_sleeping says (vLLM's is true while paused, too);
        False where it cannot tell (no lifecycle endpoints, no answer)."""
        try:
            response = await self.engine_http.get(f"{self.spec.url}/is_sleeping", timeout=5.0)
            return response.status_code == 200 and response.json().get("is_sleeping") is True
        except (httpx.HTTPError, ValueError, AttributeError):
            return False

    async def wake_if_found_asleep(self) -> None:
        """An attached engine left asleep or paused (say by an agent before us) would
        accept work and hold it: wake it before reporting ready."""
        if await self.engine_asleep_or_paused():
            log.info("engine at %s is asleep or paused: waking it", self.spec.url)
            try:
                await self.engine_call("/wake_up", timeout=LIFECYCLE_TIMEOUT_S)
            except AgentError as exc:
                log.warning("could not wake the engine: %s", exc)

    async def check_slept_outside(self) -> None:
        """Notice the engine put to sleep or paused behind idlegrid's back (sleeping:
        gateways stop sending it work, and its streams resume on other workers), and
        woken again the same way (the state machine then serves with it again)."""
        if await self.engine_asleep_or_paused():
            if self.state == READY:
                self.slept_outside = True
                self.set_state(SLEEPING, "the engine was put to sleep or paused outside idlegrid (its /sleep or /pause "
                                         "called directly); `idlegrid admin wake` or its own /wake_up brings it back")
        elif self.slept_outside:
            self.slept_outside = False
            if self.reclaim_wanted() is None:
                await self.wake("the engine was woken outside idlegrid")

    async def check_engine_answers(self) -> None:
        """A one-token completion: the engine is really serving, not only alive."""
        body = {"model": self.model, "prompt": "Hi", "max_tokens": 1, "temperature": 0}
        response = await self.engine_call("/v1/completions", json=body, timeout=60.0)
        try:
            if not response.json()["choices"]:
                raise KeyError("choices")
        except (ValueError, KeyError, TypeError):
            raise AgentError(f"engine answered a test completion without a choice: {response.text[:100]!r}") from None

    # -- reclaim and wake --------------------------------------------------

    def reclaim_wanted(self) -> str | None:
        """Why the GPU must be given back now, or None."""
        if self.operator_drained:
            return "an operator drained this worker"
        if self.slept_outside and not self.wake_requested:
            return "the engine was put to sleep or paused outside idlegrid"
        return self.watch.reason if self.watch else None

    async def yield_gpu(self, reason: str, since: float) -> None:
        """ready -> draining -> sleeping: stop new work, hand requests over, free the GPU."""
        self.reclaim_reason = reason
        self.set_state(DRAINING, reason)
        # Gateways place work only on workers Redis holds as ready (checked atomically
        # with each reservation), so once this heartbeat is in, no new work comes.
        await self.gateway_told(DRAINING, timeout=2 * self.heartbeat_interval)
        await self.hand_over()
        done = await self.free_gpu()
        self.reclaim_seconds = round(time.monotonic() - since, 3)
        self.set_state(SLEEPING, f"GPU freed {self.reclaim_seconds:.2f}s after the reclaim signal ({done})")

    async def wake(self, why: str) -> None:
        """sleeping -> waking -> ready, or back to sleeping if the engine does not answer."""
        started = time.monotonic()
        self.set_state(WAKING, why)
        try:
            if self.engine_stopped:
                await self.restart_engine()
            elif self.engine_asleep:
                await self.wake_engine()  # /wake_up resumes scheduling too
            elif self.engine_paused:
                await self.engine_call("/resume")
            elif self.slept_outside:
                await self.engine_call("/wake_up", timeout=LIFECYCLE_TIMEOUT_S)  # vLLM's resumes a paused engine, too
            self.engine_paused = self.engine_asleep = self.slept_outside = False
            await self.check_engine_answers()
        except (AgentError, EngineFailed) as exc:
            self.wake_retry_at = time.monotonic() + max(self.args.wake_after, self.args.reclaim_interval)
            self.set_state(SLEEPING, f"wake failed ({exc}); trying again later")
            return
        self.wake_seconds = round(time.monotonic() - started, 3)
        self.set_state(READY, f"engine serving again {self.wake_seconds:.2f}s after the wake began")

    async def poll_watch(self) -> None:
        if self.watch is not None:
            before = self.watch.reason
            reason = await asyncio.to_thread(self.watch.poll)
            if reason and reason != before:
                log.info("reclaim signal: %s", reason)
            elif before and not reason:
                log.info("reclaim signal cleared (was: %s)", before)

    async def control(self, beats: asyncio.Task) -> int:
        """The state machine: react to reclaim signals, commands and stop requests."""
        next_poll = 0.0
        while True:
            if beats.done():
                beats.result()  # raises what ended the heartbeats (revoked, engine died)
            if self.stop_requested.is_set():
                return await self.shut_down(beats)
            now = time.monotonic()
            if now >= next_poll:
                await self.poll_watch()
                next_poll = now + self.args.reclaim_interval
            if (self.state == READY or self.slept_outside) and now >= self.next_outside_check and not self.engine_stopped:
                await self.check_slept_outside()
                self.next_outside_check = now + OUTSIDE_SLEEP_CHECK_S
            reason = self.reclaim_wanted()
            if reason and self.state in (READY, DRAINING):
                since = self.operator_drained_at if self.operator_drained and self.operator_drained_at else now
                await self.yield_gpu(reason, since)
            elif self.state == SLEEPING and reason and self.wake_requested:
                self.wake_requested = False
                log.info("asked to wake, but %s: staying asleep", reason)
            elif self.state == SLEEPING and not reason and time.monotonic() >= self.wake_retry_at:
                quiet = self.watch.quiet_for() if self.watch else float("inf")
                if self.wake_requested or quiet >= self.args.wake_after:
                    why = "an operator woke this worker" if self.wake_requested else f"every reclaim signal clear for {quiet:.1f}s"
                    self.wake_requested = False
                    await self.wake(why)
            await self._nap(max(0.0, min(next_poll - time.monotonic(), self.heartbeat_interval)))

    async def shut_down(self, beats: asyncio.Task) -> int:
        """Stop requested: hand in-flight requests over (or wait for them). Returns the exit status."""
        if self.state in (SLEEPING, WAKING):
            return 0  # nothing is running on the engine
        self.set_state(DRAINING, "stop requested")
        if self.args.handover:
            await self.gateway_told(DRAINING, timeout=2 * self.heartbeat_interval)
            await self.hand_over()
            return 0
        deadline = time.monotonic() + self.args.drain_timeout
        log.info("draining: taking no new work; waiting up to %.0fs for in-flight requests", self.args.drain_timeout)
        while True:
            await self._nap(self.heartbeat_interval / 2)  # the heartbeat task refreshes self.metrics
            if beats.done():
                beats.result()
            if self.metrics is None or self.hurry:
                return 0  # nothing we can wait for, or no time to wait
            # Idle only counts once gateways know we are draining (or cannot reach us),
            # else a request routed a moment ago could still be on its way.
            gateway_knows = self.draining_acked_at is not None and self.metrics_at > self.draining_acked_at
            if self.metrics.in_flight == 0 and (gateway_knows or self.gateway_down_since is not None):
                log.info("drained: no requests in flight")
                return 0
            if time.monotonic() > deadline:
                log.warning("drain timeout: %d requests still in flight; stopping anyway", self.metrics.in_flight)
                return 0

    async def serve(self) -> int:
        """Heartbeat and run the state machine until told to stop. Returns the exit status."""
        if self.watch is not None:
            log.info("watching for reclaim: %s; checks every %.1fs, wake after %.1fs clear",
                     ", ".join(self.watch.sources), self.args.reclaim_interval, self.args.wake_after)
            await self.poll_watch()
            if self.watch.reason:
                self.state = DRAINING  # reclaimed already: never report ready
        if self.spec.kind == "external" and self.state == READY:
            await self.wake_if_found_asleep()
        beats = asyncio.create_task(self.heartbeats())
        beats.add_done_callback(lambda _: self._poke.set())
        try:
            return await self.control(beats)
        finally:
            beats.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await beats

    def reclaim_watch(self) -> ReclaimWatch | None:
        """The local reclaim sources the operator asked for, or None."""
        # NVML is watched by default only for vLLM: a simulated engine does not use
        # the GPU, and an attached engine's processes cannot be told from training's.
        watch_nvml = self.args.reclaim_nvml if self.args.reclaim_nvml is not None else self.spec.kind == "vllm"
        if not (self.args.reclaim_command or self.args.reclaim_file or watch_nvml):
            return None
        return ReclaimWatch(
            command=self.args.reclaim_command,
            file=self.args.reclaim_file,
            gpus=self.gpus if watch_nvml else None,
            engine_pid=lambda: self.engine.pid if self.engine is not None and not self.engine_stopped else None,
        )

    async def stop_with_parent(self, parent: int) -> None:
        """Stop once `parent` is gone, even killed outright (then no signal comes): a
        worker whose `idlegrid up` died serves nobody, and would hold its GPU for good."""
        while os.getppid() == parent:
            await asyncio.sleep(PARENT_CHECK_S)
        log.warning("the process that started this worker (pid %d) is gone: stopping", parent)
        self.hurry = True
        self.stop_requested.set()
        self._poke.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_signal, sig)
        parent_watch = asyncio.create_task(self.stop_with_parent(os.getppid())) if self.args.stop_with_parent else None
        try:
            if self.spec.kind != "sim":
                self.energy_reader = await asyncio.to_thread(nvml.gpu_energy_reader, self.gpus)
                if self.energy_reader is None:
                    log.info("no NVIDIA GPU energy counter; energy reported as unknown")
            self.start_engine()
            timeout = self.args.engine_start_timeout or DEFAULT_START_TIMEOUT[self.spec.kind]
            log.info("waiting up to %.0fs for engine at %s", timeout, self.spec.url)
            if not await wait_until_healthy(self.engine_http, self.spec.url, timeout, self.engine, self.stop_requested):
                return 0
            info = await self.describe_engine()
            self.model = info["model"]
            log.info("engine up at %s: %s", self.spec.url, info["model"])
            self.watch = self.reclaim_watch()
            if not await self.enroll(info):
                return 0
            try:
                return await self.serve()
            except Revoked:
                self.credential = None  # nothing to deregister
                raise
            finally:
                if self.credential:
                    await self.deregister()
                await self.leave_attached_engine()
        finally:
            # Signals stay ours until the engine is gone, so a second Ctrl-C cannot
            # kill the agent halfway and leave the engine behind.
            if self.engine is not None and not self.engine_stopped:
                await asyncio.to_thread(self.engine.stop)
            await self.engine_http.aclose()
            await self.gateway_http.aclose()
            if parent_watch is not None:
                parent_watch.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


def run(args: argparse.Namespace) -> int:
    try:
        _check_arguments(args)
        spec = engine_spec(args)
    except AgentError as exc:
        print(f"idlegrid worker: error: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(Agent(args, spec).run())
    except (AgentError, EngineFailed) as exc:
        log.error("%s", exc)
        return 1
