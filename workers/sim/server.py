"""HTTP for simulated engines: vLLM's OpenAI server surface over a `SimEngine`,
and a way to serve many engines from one process and one event loop.

Each engine gets its own Starlette app and uvicorn server on its own port, all
sharing the caller's event loop; an engine is one asyncio task stepping its
batch, and each open request is one handler that writes SSE chunks when tokens
arrive. That keeps a fleet of tens of engines cheap enough for a laptop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import protocol
from .engine import PAUSE_MODES, SimEngine, SimRequest
from .metrics import engine_registry
from .profiles import BLOCK_SIZE, GPUS, MODELS
from .protocol import ChatRequest, CompletionRequest, RequestError, usage_flags
from .tokens import BOS, count_reasoning_tokens, decode, encode, render_chat

VLLM_VERSION = "0.32.0"
GUARDED_PREFIXES = ("/v1", "/v2", "/inference", "/cohere")  # what vLLM's --api-key protects


# --- middleware -----------------------------------------------------------------------------


class ApiKeyMiddleware:
    """vLLM's --api-key check: Bearer token on /v1 paths; /health, /metrics and the
    dev endpoints stay open (the worker agent keeps engines on private addresses)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.digest = hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") != "OPTIONS" and scope["path"].startswith(GUARDED_PREFIXES):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = header.partition(" ")
            given = hashlib.sha256(token.encode()).digest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.digest):
                await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class LatencyMiddleware:
    """Delays every response by a center's round trip (simulated time)."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await asyncio.sleep(self.seconds)
        await self.app(scope, receive, send)


# --- the app --------------------------------------------------------------------------------


def build_app(engine: SimEngine, api: EngineApi | None = None, *, info_path: str = "/v1/sim/info") -> Starlette:
    """The engine's vLLM surface. Other engines built on the simulator's core
    (the torch engine) pass their own `api` and info route."""
    api = api or EngineApi(engine)
    routes = [
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route(info_path, api.info, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/version", api.version, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
        Route("/pause", api.pause, methods=["POST"]),
        Route("/resume", api.resume, methods=["POST"]),
        Route("/is_paused", api.is_paused, methods=["GET"]),
        Route("/sleep", api.sleep, methods=["POST"]),
        Route("/wake_up", api.wake_up, methods=["POST"]),
        Route("/is_sleeping", api.is_sleeping, methods=["GET"]),
    ]
    middleware = []
    if engine.config.api_key:
        middleware.append(Middleware(ApiKeyMiddleware, api_key=engine.config.api_key))
    if getattr(engine.config, "extra_latency_ms", 0) > 0:  # only simulated engines emulate distance
        delay = engine.config.extra_latency_ms / 1000 / engine.time_scale
        middleware.append(Middleware(LatencyMiddleware, seconds=delay))
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: _http_error})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)  # FastAPI's shape


def _error(exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _bad_query(param: str, message: str) -> JSONResponse:
    """A bad query parameter, as vLLM's validation handler reports it."""
    return JSONResponse(
        protocol.error_body(f"1 validation error:\n  {message}", "Bad Request", 400, f"query.{param}"), status_code=400
    )


class EngineApi:
    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine
        self.registry = engine_registry(engine)
        config = engine.config
        digest = hashlib.sha256(f"{config.gpu}/{config.model}/{config.seed}/{config.max_num_seqs}".encode())
        self.fingerprint = f"idlegrid-sim-{digest.hexdigest()[:8]}"

    # --- generation ---

    async def chat_completions(self, request: Request) -> Response:
        try:
            body: ChatRequest = protocol.parse_request(
                ChatRequest, request.headers.get("content-type", ""), await request.body(), self.engine.max_model_len
            )
            self._check_model(body.model)
            if not body.messages:
                raise RequestError("Cannot apply chat template to an empty conversation.")
            prompt_ids = render_chat([message.model_dump() for message in body.messages])
            max_tokens = self._max_tokens(prompt_ids, body.requested_max_tokens)
        except RequestError as exc:
            return _error(exc)
        request_id = f"chatcmpl-{self._request_id(request, body)}"
        sim = self.engine.submit(request_id, prompt_ids, max_tokens, seed=body.seed, ignore_eos=body.ignore_eos)
        created = int(time.time())
        if body.stream:
            return _sse(self._chat_chunks(sim, body, created))
        done = await _unless_disconnected(request, self.engine, sim)
        if done is None:
            return Response(status_code=499)
        return JSONResponse(
            protocol.chat_response(
                request_id=request_id, created=created, model=self.engine.model_name, fingerprint=self.fingerprint,
                text=decode(sim.output_ids), output_ids=sim.output_ids, prompt_ids=prompt_ids,
                finish_reason=sim.finish_reason or "stop", reasoning_tokens=count_reasoning_tokens(sim.output_ids),
                include_reasoning=body.include_reasoning, return_token_ids=bool(body.return_token_ids),
            )
        )

    async def completions(self, request: Request) -> Response:
        try:
            body: CompletionRequest = protocol.parse_request(
                CompletionRequest, request.headers.get("content-type", ""), await request.body(), self.engine.max_model_len
            )
            self._check_model(body.model)
            prompt_ids = self._completion_prompt(body.prompt)
            max_tokens = self._max_tokens(prompt_ids, body.requested_max_tokens)
        except RequestError as exc:
            return _error(exc)
        request_id = f"cmpl-{self._request_id(request, body)}"
        sim = self.engine.submit(request_id, prompt_ids, max_tokens, seed=body.seed, ignore_eos=body.ignore_eos)
        created = int(time.time())
        if body.stream:
            return _sse(self._completion_chunks(sim, body, created))
        done = await _unless_disconnected(request, self.engine, sim)
        if done is None:
            return Response(status_code=499)
        return JSONResponse(
            protocol.completion_response(
                request_id=request_id, created=created, model=self.engine.model_name, fingerprint=self.fingerprint,
                text=decode(sim.output_ids), output_ids=sim.output_ids, prompt_ids=prompt_ids,
                finish_reason=sim.finish_reason or "stop", return_token_ids=bool(body.return_token_ids),
            )
        )

    async def _chat_chunks(self, sim: SimRequest, body: ChatRequest, created: int) -> AsyncIterator[bytes]:
        engine = self.engine
        head = {"id": sim.id, "object": "chat.completion.chunk", "created": created, "model": engine.model_name}
        include_usage, continuous = usage_flags(body)
        with_ids = bool(body.return_token_ids) and body.include_reasoning
        prompt_tokens = len(sim.prompt_ids)
        reasoning = protocol.ReasoningStream(sim.prompt_ids)
        fast = protocol.TokenChunks(head)
        generated: list[int] = []
        try:
            first = True
            async for ids, finish in engine.stream(sim):
                if first:
                    first = False
                    chunk: dict[str, Any] = {
                        **head,
                        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
                    }
                    if continuous:
                        chunk["usage"] = protocol.chat_usage(prompt_tokens, 0, 0)
                    chunk["prompt_token_ids"] = sim.prompt_ids if body.return_token_ids else None
                    chunk["prompt_text"] = None
                    yield protocol.sse(chunk)
                if not ids and not generated:
                    continue  # aborted before its first token: vLLM sends nothing for it
                text = decode(ids)
                delta = reasoning.delta(text, ids)
                generated += ids
                if delta is not None and not body.include_reasoning:
                    delta["reasoning"] = None
                    if not delta.get("content"):
                        delta = None
                if delta is None:
                    if finish is None and not with_ids:
                        continue
                    delta = {}
                if finish is None and not continuous:
                    yield fast.chat(delta, ids if with_ids else None)
                    continue
                choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                if finish is not None:
                    choice["stop_reason"] = None
                choice["token_ids"] = ids if with_ids else None
                chunk = {**head, "choices": [choice]}
                if continuous:
                    chunk["usage"] = protocol.chat_usage(prompt_tokens, len(generated), count_reasoning_tokens(generated))
                if finish is not None and not include_usage:
                    chunk["system_fingerprint"] = self.fingerprint
                yield protocol.sse(chunk)
            if include_usage:
                usage = protocol.chat_usage(prompt_tokens, len(generated), count_reasoning_tokens(generated))
                yield protocol.sse({**head, "choices": [], "usage": usage, "system_fingerprint": self.fingerprint})
            yield protocol.SSE_DONE
        finally:
            engine.abort(sim)  # the client went away mid-stream: free the slot now

    async def _completion_chunks(self, sim: SimRequest, body: CompletionRequest, created: int) -> AsyncIterator[bytes]:
        engine = self.engine
        head = {"id": sim.id, "object": "text_completion", "created": created, "model": engine.model_name}
        include_usage, continuous = usage_flags(body)
        prompt_tokens = len(sim.prompt_ids)
        fast = protocol.TokenChunks(head)
        generated = 0
        prompt_ids_sent = False
        try:
            async for ids, finish in engine.stream(sim):
                prompt_ids_to_return = None
                if not prompt_ids_sent and body.return_token_ids:
                    prompt_ids_to_return, prompt_ids_sent = sim.prompt_ids, True
                if not ids and not generated:
                    continue
                generated += len(ids)
                token_ids = ids if body.return_token_ids else None
                if finish is None and not continuous:
                    yield fast.completion(decode(ids), prompt_ids_to_return, token_ids)
                    continue
                choice = {
                    "index": 0, "text": decode(ids), "logprobs": None, "finish_reason": finish, "stop_reason": None,
                    "prompt_token_ids": prompt_ids_to_return, "token_ids": token_ids,
                }
                chunk: dict[str, Any] = {**head, "choices": [choice]}
                if continuous:
                    chunk["usage"] = protocol.completion_usage(prompt_tokens, generated)
                if finish is not None and not include_usage:
                    chunk["system_fingerprint"] = self.fingerprint
                yield protocol.sse(chunk)
            if include_usage:
                usage = protocol.completion_usage(prompt_tokens, generated)
                yield protocol.sse({**head, "choices": [], "usage": usage, "system_fingerprint": self.fingerprint})
            yield protocol.SSE_DONE
        finally:
            engine.abort(sim)

    def _check_model(self, model: str | None) -> None:
        if model and model != self.engine.model_name:
            raise RequestError(
                f"The model `{model}` does not exist. Valid aliases: {self.engine.model_name}.",
                status=404, err_type="NotFoundError", param="model",
            )

    def _completion_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return [BOS, *encode(prompt)]  # the R1 tokenizer adds BOS to plain text
        if not prompt:
            raise RequestError("You must pass at least one prompt")
        low, high = min(prompt), max(prompt)
        if low < 0 or high >= self.engine.model.vocab_size:
            raise RequestError(f"Token id {low if low < 0 else high} is out of vocabulary")
        return list(prompt)

    def _max_tokens(self, prompt_ids: list[int], requested: int | None) -> int:
        """vLLM's get_max_tokens: what is asked for, clipped to the room left in the context."""
        limit, length = self.engine.max_model_len, len(prompt_ids)
        if length > limit:
            raise RequestError.invalid(
                f"This model's maximum context length is {limit} tokens. However, your prompt contains "
                f"{length} input tokens, which exceeds this limit even without any output tokens. "
                "Please reduce the length of the input prompt.",
                "input_tokens", length,
            )
        if length == limit:
            raise RequestError(
                f"The decoder prompt (length {length}) plus the number of requested output tokens (at least 1) "
                f"is longer than the maximum model length of {limit}. Make sure that `max_model_len` is no "
                "smaller than the number of text tokens (prompt + requested output tokens)."
            )
        room = limit - length
        return room if requested is None else min(room, requested)

    @staticmethod
    def _request_id(request: Request, body: Any) -> str:
        header = request.headers.get("x-request-id")
        if header is not None:
            return header
        return body.request_id or f"{uuid.uuid4().int & (2**64 - 1):016x}"  # vLLM's random_uuid()

    # --- models, health, metrics, info ---

    async def models(self, request: Request) -> Response:
        engine = self.engine
        now = int(time.time())
        card = {
            "id": engine.model_name, "object": "model", "created": now, "owned_by": "idlegrid-sim",
            "root": engine.model.hf_id, "parent": None, "max_model_len": engine.max_model_len,
            "permission": [{
                "id": f"modelperm-{uuid.uuid4().hex[:16]}", "object": "model_permission", "created": now,
                "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                "organization": "*", "group": None, "is_blocking": False,
            }],
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": f"{VLLM_VERSION}+idlegrid.sim"})

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def info(self, request: Request) -> Response:
        engine, perf = self.engine, self.engine.perf
        return JSONResponse({
            "simulated": True,
            "gpu": {"id": engine.gpu.id, "name": engine.gpu.name, "memory_gib": round(engine.gpu.memory_gib, 2),
                    "hbm_bytes_per_s": engine.gpu.hbm_bytes_per_s, "bf16_flops": engine.gpu.bf16_flops,
                    "idle_w": engine.gpu.idle_w, "max_w": engine.gpu.max_w},
            "model": {"id": engine.model.id, "hf_id": engine.model.hf_id, "served_name": engine.model_name,
                      "params": engine.model.params, "layers": engine.model.layers,
                      "kv_bytes_per_token": engine.model.kv_bytes_per_token,
                      "mean_reasoning_tokens": engine.model.mean_reasoning_tokens,
                      "mean_answer_tokens": engine.model.mean_answer_tokens},
            "profiles": {"gpus": list(GPUS), "models": list(MODELS)},
            "max_num_seqs": engine.config.max_num_seqs,
            "max_model_len": engine.max_model_len,
            "max_num_batched_tokens": engine.config.max_num_batched_tokens,
            "kv_capacity_tokens": perf.kv_capacity_tokens,
            "num_gpu_blocks": engine.num_gpu_blocks,
            "block_size": BLOCK_SIZE,
            "time_scale": engine.time_scale,
            "seed": engine.config.seed,
            "tpot_base_ms": round(perf.tpot_base_ms, 4),
            "tpot_ms_per_1k_kv": round(perf.tpot_ms_per_1k_kv, 5),
            "tpot_ms_per_seq": round(perf.tpot_ms_per_seq, 5),
            "energy_source": "modeled",
            "energy_j": engine.energy_now(),
            "power_w": engine.power_w,
            "sim_seconds": engine.sim_seconds,
            "busy_seconds": engine.busy_seconds,
            "lag_seconds": engine.lag_seconds,
            "held_requests": len(engine.held),
            "extra_latency_ms": engine.config.extra_latency_ms,
        })

    # --- lifecycle (vLLM's dev-mode endpoints) ---

    async def pause(self, request: Request) -> Response:
        mode = request.query_params.get("mode", "abort")
        if mode not in PAUSE_MODES:
            return _bad_query("mode", f"{{'type': 'literal_error', 'loc': 'query.mode', 'msg': \"Input should be 'abort', 'wait' or 'keep'\"}}")
        await self.engine.pause(mode)
        return JSONResponse({"status": "paused"})

    async def resume(self, request: Request) -> Response:
        self.engine.resume()
        return JSONResponse({"status": "resumed"})

    async def is_paused(self, request: Request) -> Response:
        return JSONResponse({"is_paused": self.engine.is_paused})

    async def sleep(self, request: Request) -> Response:
        raw_level = request.query_params.get("level", "1")
        mode = request.query_params.get("mode", "abort")
        if raw_level not in ("0", "1", "2"):
            return _bad_query("level", f"{{'type': 'int_range', 'loc': 'query.level', 'msg': 'level must be 0, 1 or 2, got {raw_level!r}'}}")
        if mode not in PAUSE_MODES:
            return _bad_query("mode", f"{{'type': 'literal_error', 'loc': 'query.mode', 'msg': \"Input should be 'abort', 'wait' or 'keep'\"}}")
        level = int(raw_level)
        await self.engine.sleep(level, mode)
        return JSONResponse({"status": "sleeping", "level": level})

    async def wake_up(self, request: Request) -> Response:
        tags = request.query_params.getlist("tags") or None
        await self.engine.wake_up()
        return JSONResponse({"status": "awake", "tags": tags})

    async def is_sleeping(self, request: Request) -> Response:
        # vLLM answers true while merely paused, too (scheduler paused or executor asleep).
        return JSONResponse({"is_sleeping": self.engine.is_sleeping or self.engine.is_paused})


def _sse(chunks: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream")


async def _unless_disconnected(request: Request, engine: SimEngine, sim: SimRequest) -> SimRequest | None:
    """Wait for a non-streaming request to finish; if the client leaves first, abort it."""
    finished = asyncio.ensure_future(engine.result(sim))
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not finished.done():
            finished.cancel()
            engine.abort(sim)
    return sim if finished.done() and not finished.cancelled() else None


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# --- serving many engines -------------------------------------------------------------------


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to whoever runs the fleet."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class SimServer:
    """Serves engines on their ports from the current event loop."""

    def __init__(self, engines: Sequence[SimEngine], *, log_level: str = "warning",
                 app_for: Callable[[Any], Starlette] = build_app) -> None:
        self.engines = list(engines)
        self.log_level = log_level
        self.app_for = app_for
        self._servers: list[_Server] = []
        self._tasks: list[asyncio.Task] = []

    @property
    def urls(self) -> list[str]:
        return [engine.url for engine in self.engines]

    async def start(self) -> None:
        """Bind every port, start the engines and return once all are listening."""
        sockets = [_bind(engine.config.host, engine.config.port) for engine in self.engines]
        for engine, sock in zip(self.engines, sockets):
            engine.config.port = sock.getsockname()[1]
            config = uvicorn.Config(
                self.app_for(engine), log_level=self.log_level, access_log=False, lifespan="off",
                timeout_keep_alive=30, timeout_graceful_shutdown=1,
            )
            server = _Server(config)
            engine.start()
            self._servers.append(server)
            self._tasks.append(asyncio.create_task(server.serve(sockets=[sock])))
        while not all(server.started for server in self._servers):
            failed = [task for task in self._tasks if task.done()]
            if failed:
                await self.stop()
                failed[0].result()
                raise RuntimeError(f"the engine server on port {engine.config.port} stopped while starting")
            await asyncio.sleep(0.01)

    async def wait(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def stop(self) -> None:
        for server in self._servers:
            server.should_exit = True
        for engine in self.engines:
            await engine.stop()  # ends open streams, so servers need not wait for them
        await self.wait()


async def serve_until_signalled(server: SimServer) -> None:
    """Serve a started server until SIGINT/SIGTERM (or until it stops), then stop it."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    waiting = asyncio.ensure_future(server.wait())
    stop_requested = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({waiting, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
    stop_requested.cancel()
    await server.stop()


async def serve_engines(engines: Sequence[SimEngine], *, log_level: str = "warning") -> None:
    """Serve engines until cancelled."""
    server = SimServer(engines, log_level=log_level)
    await server.start()
    try:
        await server.wait()
    finally:
        await server.stop()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class EnginesInThread:
    """Engines served from a private event loop in a daemon thread.

    For tests and scripts that are not async themselves:

        with EnginesInThread([SimEngine(time_scale=50)]) as fleet:
            httpx.get(fleet.urls[0] + "/health")
    """

    def __init__(self, engines: Sequence[SimEngine], *, log_level: str = "warning",
                 app_for: Callable[[Any], Starlette] = build_app) -> None:
        self.engines = list(engines)
        self.loop = asyncio.new_event_loop()
        self._server = SimServer(self.engines, log_level=log_level, app_for=app_for)
        self._thread = threading.Thread(target=self.loop.run_forever, name="sim-engines", daemon=True)

    @property
    def urls(self) -> list[str]:
        return self._server.urls

    def start(self) -> EnginesInThread:
        self._thread.start()
        self.call(self._server.start(), timeout=30)
        return self

    def call(self, coro: Awaitable[Any], timeout: float | None = 10) -> Any:
        """Run a coroutine on the engines' loop (the only safe way to touch an engine)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Callable[[], Any], timeout: float | None = 10) -> Any:
        async def call() -> Any:
            return fn()
        return self.call(call(), timeout)

    def stop(self) -> None:
        if self._thread.is_alive():
            try:
                self.call(self._server.stop(), timeout=10)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(timeout=10)
        self.loop.close()

    def __enter__(self) -> EnginesInThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
