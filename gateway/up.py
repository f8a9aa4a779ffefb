"""`idlegrid up`: everything on one machine.

A private Redis, one gateway (in this process) and a local fleet: one worker
agent per GPU, each in a process of its own with its own engine process, so one
can fail without the others. Ctrl-C or SIGTERM stops all of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis.asyncio as aioredis
import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.embedded_redis import EmbeddedRedis, RedisNotFound
from gateway.errors import UserError
from gateway.fleet import READY
from gateway.fleet_file import Fleet, FleetFileError, WorkerGroup, load_fleet
from gateway.policies import DEFAULT_POLICY, POLICIES
from gateway.registry import Registry
from gateway.serve import UVICORN_OPTIONS, EmbeddedServer, tune_gc

DEFAULT_SIM_MODEL = "deepseek-r1-distill-qwen-1.5b"
DEFAULT_VLLM_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
# How long a stopping `up` lets its workers finish the answers in flight.
DRAIN_TIMEOUT_S = 10


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address the gateway listens on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")
    p.add_argument("--api-key", help="API key clients use (default: one is generated and printed)")
    p.add_argument("--admin-token", default=os.environ.get("IDLEGRID_ADMIN_TOKEN"), help="admin API token (default: generated and printed)")
    p.add_argument("--workers", type=int, default=3, help="local workers when no --fleet is given (default 3)")
    p.add_argument("--centers", default="dc-a,dc-b", help="centers the local workers are spread over (default dc-a,dc-b)")
    p.add_argument("--engine", choices=["auto", "sim", "vllm"], default="auto", help="engines to run: vllm where an NVIDIA GPU is, else simulated (default auto)")
    p.add_argument("--model", help=f"model to serve (default: {DEFAULT_SIM_MODEL} simulated, {DEFAULT_VLLM_MODEL} on vLLM)")
    p.add_argument("--gpu", default="h100", help="GPU profile of simulated workers (default h100)")
    p.add_argument("--time-scale", type=float, default=1.0, help="simulated seconds per wall-clock second (default 1)")
    p.add_argument("--policy", default=DEFAULT_POLICY, choices=sorted(POLICIES), help=f"routing policy (default {DEFAULT_POLICY})")
    p.add_argument("--fleet", metavar="FILE", help="TOML fleet file ([[workers]] center, gpu, model, count)")
    p.add_argument("--redis", metavar="URL", help="use this Redis instead of starting a private one")
    p.add_argument("--state-dir", default=".idlegrid", help="where the private Redis and logs live (default ./.idlegrid)")
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for the fleet to become ready")
    p.add_argument("engine_args", nargs="*", metavar="-- ENGINE_ARGS", help="extra vLLM arguments, after --")


def _gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount()
    except Exception:
        return 0


def plan_fleet(args: argparse.Namespace) -> Fleet:
    if args.fleet:
        try:
            return load_fleet(args.fleet)
        except FleetFileError as exc:
            raise UserError(str(exc)) from None
    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    centers = [c.strip() for c in args.centers.split(",") if c.strip()]
    if not centers:
        raise UserError("--centers needs at least one center name")
    engine = args.engine
    if engine == "auto":
        engine = "vllm" if _gpu_count() > 0 else "sim"
    model = args.model or (DEFAULT_VLLM_MODEL if engine == "vllm" else DEFAULT_SIM_MODEL)
    groups = [WorkerGroup(centers[i % len(centers)], args.gpu, model, 1, engine) for i in range(args.workers)]
    if engine == "sim":
        from gateway.fleet_file import parse_fleet

        try:  # same checks as a fleet file
            parse_fleet({"workers": [g.__dict__ for g in groups]}, "flags")
        except FleetFileError as exc:
            raise UserError(str(exc).replace("flags: workers[0].", "--")) from None
    return Fleet(groups)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        # As uvicorn binds: connections of a gateway stopped a moment ago, still in
        # TIME_WAIT, do not make the port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


class Up:
    def __init__(self, args: argparse.Namespace, fleet: Fleet):
        self.args = args
        self.fleet = fleet
        self.state_dir = Path(args.state_dir).resolve()
        self.redis_server: EmbeddedRedis | None = None
        self.agents: list[subprocess.Popen] = []
        self.stop = asyncio.Event()

    def _on_signal(self) -> None:
        if self.stop.is_set():
            print("idlegrid: stopping now, cutting off the answers in flight", flush=True)
            for agent in self.agents:
                if agent.poll() is None:
                    agent.send_signal(signal.SIGTERM)  # its second signal: it stops without waiting for them
        self.stop.set()

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.args.host in ("0.0.0.0", "") else self.args.host
        return f"http://{host}:{self.args.port}"

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        try:
            return await self._serve()
        finally:
            await self._shutdown()

    async def _serve(self) -> int:
        args = self.args
        if not _port_free(args.host, args.port):
            raise UserError(f"port {args.port} on {args.host} is already in use (choose another with --port)")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)
        redis_url = args.redis
        if not redis_url:
            try:
                self.redis_server = EmbeddedRedis(self.state_dir / "redis").start()
            except (RedisNotFound, RuntimeError, TimeoutError) as exc:
                raise UserError(str(exc)) from None
            redis_url = self.redis_server.url
        admin_token = args.admin_token or "adm-" + secrets.token_urlsafe(24)
        client = aioredis.Redis.from_url(redis_url)
        registry = Registry(client)
        try:
            await client.ping()
        except aioredis.RedisError as exc:
            raise UserError(f"cannot reach Redis at {redis_url}: {exc}") from None
        if not args.redis:
            # The private Redis belongs to this state dir: any worker registered there
            # is a previous run's (stopped hard, before it could deregister).
            for stale in await registry.workers():
                await registry.remove(stale.id)
        api_key = args.api_key or "sk-ig-" + secrets.token_urlsafe(24)
        await registry.add_api_key(api_key, name="default")

        home = self.fleet.centers[0]
        config = GatewayConfig(
            redis_url=redis_url, center=home, policy=args.policy, admin_token=admin_token,
            center_rtt_ms={c: self.fleet.rtt(home, c) for c in self.fleet.centers if c != home},
        )
        server = EmbeddedServer(uvicorn.Config(create_app(config), host=args.host, port=args.port, **UVICORN_OPTIONS))
        serve_task = asyncio.create_task(server.serve())
        while not server.started:
            if serve_task.done():
                raise UserError(f"gateway failed to start on {args.host}:{args.port}")
            await asyncio.sleep(0.05)

        for n, group in enumerate(g for g in self.fleet.groups for _ in range(g.count)):
            token = await registry.create_enroll_token(center=group.center, ttl_s=600, uses=1)
            self.agents.append(self._spawn_agent(n, group, token))

        kind = "simulated" if all(g.engine == "sim" for g in self.fleet.groups) else "vLLM"
        print(
            f"idlegrid is up: {self.fleet.size} {kind} worker(s) in {', '.join(self.fleet.centers)}"
            + (" (SIMULATED engines: numbers are modeled, not measured)" if kind == "simulated" else "")
            + f"\n  OpenAI base URL: {self.base_url}/v1"
            f"\n  API key:         {api_key}"
            f"\n  Admin token:     {admin_token}"
            f"\n  Redis:           {redis_url}"
            f"\n  Logs:            {self.state_dir / 'logs'}"
            "\nPress Ctrl-C to stop.",
            flush=True,
        )
        await self._report_ready(registry)
        await self.stop.wait()
        print(f"idlegrid: stopping (workers finish the answers in flight, up to {DRAIN_TIMEOUT_S:g} s; "
              "Ctrl-C again to stop at once)...", flush=True)
        self._engine_pids = [w.engine_pid for w in await registry.workers() if w.engine_pid]
        await self._stop_agents()
        server.should_exit = True
        await serve_task
        await client.aclose()
        return 0

    def _spawn_agent(self, n: int, group: WorkerGroup, token: str) -> subprocess.Popen:
        cmd = [
            sys.executable, "-m", "gateway.cli", "worker",
            "--gateway", self.base_url, "--token", token, "--center", group.center,
            "--engine", group.engine, "--model", group.model, "--drain-timeout", str(DRAIN_TIMEOUT_S),
            # Everything stops together: there is no other worker to hand streams to.
            "--no-handover",
            # Killed outright (no Ctrl-C to pass on), `up` still takes its workers with it.
            "--stop-with-parent",
        ]
        env = dict(os.environ)
        if group.engine == "sim":
            # One seed for the fleet, like one set of weights: any worker continues any answer exactly.
            cmd += ["--gpu", group.gpu, "--time-scale", str(self.args.time_scale), "--seed", "0"]
            # Emulate the distance from the gateway's center to this worker's.
            rtt = self.fleet.rtt(self.fleet.centers[0], group.center)
            if rtt:
                cmd += ["--extra-latency-ms", str(rtt)]
        else:
            env.setdefault("CUDA_VISIBLE_DEVICES", str(n))
            if self.args.engine_args:
                cmd += ["--", *self.args.engine_args]
        log = open(self.state_dir / "logs" / f"worker-{n}.log", "ab")
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    async def _report_ready(self, registry: Registry) -> None:
        deadline = time.monotonic() + self.args.ready_timeout
        while not self.stop.is_set():
            ready = sum(w.state == READY for w in await registry.workers())
            if ready >= self.fleet.size:
                print(f"fleet ready: {ready}/{self.fleet.size} workers serving", flush=True)
                return
            dead = [a for a in self.agents if a.poll() is not None]
            if time.monotonic() > deadline or len(dead) == len(self.agents):
                print(f"warning: {ready}/{self.fleet.size} workers ready; see {self.state_dir / 'logs'}", flush=True)
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.2)

    async def _stop_agents(self, timeout: float = DRAIN_TIMEOUT_S + 5) -> None:
        for agent in self.agents:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)  # the agent drains, deregisters, stops its engine
        deadline = time.monotonic() + timeout
        while any(a.poll() is None for a in self.agents) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for agent in self.agents:
            if agent.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()

    async def _shutdown(self) -> None:
        if any(a.poll() is None for a in self.agents):
            await self._stop_agents(timeout=5.0)
        # An agent killed hard cannot stop its engine: make sure none is left behind.
        for pid in getattr(self, "_engine_pids", []):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        if self.redis_server:
            self.redis_server.stop()


def run(args: argparse.Namespace) -> int:
    fleet = plan_fleet(args)
    tune_gc()  # the gateway serves from this process
    try:  # the gateway runs in this process: give it the same C event loop `idlegrid gateway` gets
        import uvloop
    except ImportError:
        return asyncio.run(Up(args, fleet).main())
    return uvloop.run(Up(args, fleet).main())
