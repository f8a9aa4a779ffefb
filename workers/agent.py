"""`idlegrid worker`: the agent an operator runs beside one GPU.

It starts an engine (vLLM or the simulated one) in a process group of its own,
or attaches to one already running, waits until the engine is healthy, enrolls
with a gateway using a one-time token, and then heartbeats every second with
the load it scrapes from the engine's `/metrics` and the GPU's energy counter.
Workers never see Redis: everything goes through the gateway's control API.

On SIGTERM or SIGINT it reports "draining" so gateways stop sending new work,
lets in-flight requests finish (bounded by --drain-timeout), deregisters and
stops the engine. A second signal skips the wait.
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
from dataclasses import dataclass

import httpx

from workers import nvml
from workers.engine_metrics import EngineMetrics, parse_metrics
from workers.engine_process import EngineFailed, EngineProcess, wait_until_healthy

log = logging.getLogger("idlegrid.worker")

READY = "ready"
DRAINING = "draining"

# Time an engine gets to answer /health after it is launched: vLLM loads weights
# and profiles memory (minutes on a big model); the simulated engine is instant.
DEFAULT_START_TIMEOUT = {"vllm": 1800.0, "sim": 60.0, "external": 60.0}


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
    engine.add_argument("--engine", choices=["vllm", "sim"], help="launch a vLLM or a simulated engine")
    engine.add_argument("--engine-url", metavar="URL", help="attach to an engine that is already running")
    engine.add_argument("--engine-api-key", metavar="KEY", help="API key of the --engine-url engine")
    engine.add_argument("--model", help="model to serve (vllm: a path or hub id; sim: a model profile id)")
    engine.add_argument("--gpu", help="GPU profile (sim, required) or GPU name to report (default: from NVML)")
    engine.add_argument("--gpu-index", help="NVML index or UUID of the GPU to meter (default: first of CUDA_VISIBLE_DEVICES, else 0)")
    engine.add_argument("--time-scale", type=float, help="sim: simulated seconds per wall-clock second")
    engine.add_argument("--seed", type=int, help="sim: seed of the deterministic output")
    engine.add_argument("--max-num-seqs", type=int, help="most sequences the engine runs at once")
    engine.add_argument("--host", default="127.0.0.1", help="address the launched engine listens on (default 127.0.0.1)")
    engine.add_argument("--advertise-host", help="host gateways use to reach the engine (default: --host, or this machine's name if --host is 0.0.0.0)")
    engine.add_argument("--engine-port", type=int, help="port of the launched engine (default: a free one)")
    engine.add_argument("--engine-start-timeout", type=float, metavar="S", help="seconds to wait for engine /health (default: vllm 1800, sim 60)")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0, metavar="S", help="seconds between heartbeats (default 1.0)")
    parser.add_argument("--drain-timeout", type=float, default=30.0, metavar="S", help="seconds in-flight requests get to finish on shutdown (default 30)")
    parser.add_argument("engine_args", nargs="*", metavar="-- ENGINE_ARGS", help="extra arguments for vLLM, after --")


def _check_arguments(args: argparse.Namespace) -> None:
    """Combinations argparse cannot express; raises AgentError with one line."""
    if not args.token:
        raise AgentError("--token is required (or set IDLEGRID_ENROLL_TOKEN)")
    if not args.gateway.startswith(("http://", "https://")):
        raise AgentError(f"--gateway must be an http(s) URL, got {args.gateway!r}")
    if bool(args.engine) == bool(args.engine_url):
        raise AgentError("give exactly one of --engine vllm|sim or --engine-url URL")
    if args.engine_url and not args.engine_url.startswith(("http://", "https://")):
        raise AgentError(f"--engine-url must be an http(s) URL, got {args.engine_url!r}")
    if args.engine_api_key and not args.engine_url:
        raise AgentError("--engine-api-key is for --engine-url; launched engines get a fresh key of their own")
    if args.engine and not args.model:
        raise AgentError(f"--engine {args.engine} needs --model")
    if args.engine == "sim" and not args.gpu:
        raise AgentError("--engine sim needs --gpu (a GPU profile such as h100)")
    if args.engine != "sim" and (args.time_scale is not None or args.seed is not None):
        raise AgentError("--time-scale and --seed only apply to --engine sim")
    if args.engine_args and args.engine != "vllm":
        raise AgentError(f"extra engine arguments {' '.join(args.engine_args)!r} only apply to --engine vllm")
    if args.heartbeat_interval <= 0 or args.heartbeat_interval > 1.0:
        raise AgentError("--heartbeat-interval must be more than 0 and at most 1 second")
    if args.drain_timeout < 0:
        raise AgentError("--drain-timeout must not be negative")


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
        return EngineSpec("sim", url, api_key, argv=argv, env=None, max_num_seqs=args.max_num_seqs)
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
        self.stop_requested = asyncio.Event()
        self._signalled = asyncio.Event()
        self.hurry = False  # a second signal: skip the drain wait
        self.state = READY
        self.worker_id: str | None = None
        self.credential: str | None = None
        self.heartbeat_interval = args.heartbeat_interval
        self.energy_reader: nvml.GpuEnergyReader | None = None
        self._metrics_failing = False
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
        self._signalled.set()

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
        }
        metrics = await self.scrape()
        if metrics is not None and metrics.kv_capacity_tokens:
            info["kv_capacity_tokens"] = metrics.kv_capacity_tokens
        if self.spec.kind == "sim":
            response = await self.engine_http.get(f"{self.spec.url}/v1/sim/info")
            response.raise_for_status()
            sim = response.json()
            for field in ("max_num_seqs", "kv_capacity_tokens", "tpot_base_ms", "tpot_ms_per_1k_kv"):
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

    async def heartbeat(self, metrics: EngineMetrics) -> str | None:
        """Send one heartbeat; returns the gateway's command. Raises Revoked on 401/403,
        httpx.HTTPError (or AgentError for a 5xx) when the gateway cannot be reached."""
        power_w, energy_j, source = self.energy(metrics)
        body = {
            "state": self.state,
            "running": metrics.running,
            "waiting": metrics.waiting,
            "kv_usage": metrics.kv_usage,
            "power_w": power_w,
            "energy_j": energy_j,
            "energy_source": source,
        }
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
        """Sleep, but wake at once when a signal arrives."""
        try:
            await asyncio.wait_for(self._signalled.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass
        self._signalled.clear()

    async def serve(self) -> int:
        """Heartbeat until told to stop, then drain. Returns the exit status."""
        gateway_down_since: float | None = None
        retry_delay = self.heartbeat_interval
        drain_deadline: float | None = None
        gateway_knows_draining = False
        while True:
            tick = time.monotonic()
            if self.engine_exited() is not None:
                raise EngineFailed(f"{self.engine.name} exited unexpectedly with code {self.engine_exited()}")
            if self.stop_requested.is_set() and drain_deadline is None:
                self.state = DRAINING
                drain_deadline = tick + self.args.drain_timeout
                log.info("draining: taking no new work; waiting up to %.0fs for in-flight requests", self.args.drain_timeout)

            metrics = await self.scrape()
            if metrics is not None:
                # An engine we cannot read gets no heartbeat, so gateways stop routing to it.
                try:
                    command = await self.heartbeat(metrics)
                except Revoked:
                    raise
                except (httpx.HTTPError, AgentError) as exc:
                    if gateway_down_since is None:
                        gateway_down_since = tick
                        log.warning("gateway %s unreachable (%s); engine keeps running, retrying", self.gateway, _problem(exc))
                    retry_delay = min(retry_delay * 2, 5.0)
                else:
                    if gateway_down_since is not None:
                        log.info("gateway %s reachable again after %.0fs", self.gateway, tick - gateway_down_since)
                        gateway_down_since = None
                    retry_delay = self.heartbeat_interval
                    gateway_knows_draining = self.state == DRAINING
                    self.apply(command)

            if drain_deadline is not None:
                if metrics is None or self.hurry:
                    return 0  # nothing we can wait for, or no time to wait
                # Idle only counts once gateways know we are draining (or cannot reach
                # us), else a request routed a moment ago could still be on its way.
                if metrics.in_flight == 0 and (gateway_knows_draining or gateway_down_since is not None):
                    log.info("drained: no requests in flight")
                    return 0
                if tick > drain_deadline:
                    log.warning("drain timeout: %d requests still in flight; stopping anyway", metrics.in_flight)
                    return 0
                delay = self.heartbeat_interval
            else:
                delay = retry_delay if gateway_down_since is not None else self.heartbeat_interval
            await self._nap(max(0.0, delay - (time.monotonic() - tick)))

    def apply(self, command: str | None) -> None:
        """Act on what the gateway asked for in its heartbeat reply."""
        if not command or self.stop_requested.is_set():
            return
        if command == "drain" and self.state != DRAINING:
            log.info("gateway asked to drain: taking no new work")
            self.state = DRAINING
        elif command == "wake" and self.state != READY:
            log.info("gateway asked to wake: ready for work")
            self.state = READY
        elif command == "stop":
            log.info("gateway asked to stop")
            self.stop_requested.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_signal, sig)
        try:
            if self.spec.kind != "sim":
                index = self.args.gpu_index if self.args.gpu_index is not None else nvml.visible_gpu_index()
                self.energy_reader = await asyncio.to_thread(nvml.gpu_energy_reader, index)
                if self.energy_reader is None:
                    log.info("no NVIDIA GPU energy counter; energy reported as unknown")
            self.start_engine()
            timeout = self.args.engine_start_timeout or DEFAULT_START_TIMEOUT[self.spec.kind]
            log.info("waiting up to %.0fs for engine at %s", timeout, self.spec.url)
            if not await wait_until_healthy(self.engine_http, self.spec.url, timeout, self.engine, self.stop_requested):
                return 0
            info = await self.describe_engine()
            log.info("engine up at %s: %s", self.spec.url, info["model"])
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
        finally:
            # Signals stay ours until the engine is gone, so a second Ctrl-C cannot
            # kill the agent halfway and leave the engine behind.
            if self.engine is not None:
                await asyncio.to_thread(self.engine.stop)
            await self.engine_http.aclose()
            await self.gateway_http.aclose()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # One line per event, not one per heartbeat request.
        logging.getLogger("httpx").setLevel(logging.WARNING)
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
