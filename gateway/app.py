"""The gateway application: one Starlette app, its shared parts, and its routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, AsyncIterator

import httpx
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import admin, control, keys, serving
from gateway.config import GatewayConfig
from gateway.dispatch import Dispatcher
from gateway.engine_client import EngineClient
from gateway.estimates import AnswerStats
from gateway.errors import APIError, api_error_handler, http_exception_handler, redis_error_handler, unhandled_error_handler
from gateway.fleet import GONE, READY
from gateway.metrics import GatewayMetrics
from gateway.policies import POLICIES, make_policy
from gateway.registry import Registry

log = logging.getLogger("idlegrid.gateway")

_KEY_CACHE_S = 5.0  # a revoked API key stops working within this long, had its revocation message been missed
_PING_EVERY_S = 5.0  # how often the round trip to each center is measured


class Gateway:
    """Everything one gateway process shares between requests."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.log = log
        self.metrics = GatewayMetrics()
        # A restarted Redis leaves dead pooled connections: retry a command briefly on a
        # fresh one, so a blip is invisible and a real outage still answers 503 fast.
        self.redis = aioredis.Redis.from_url(
            config.redis_url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=10,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 3), retry_on_error=[RedisConnectionError, RedisTimeoutError],
            # redis-py's default pool holds 100 connections and fails (not waits) beyond
            # them; a gateway relaying hundreds of streams has more calls than that in flight.
            max_connections=4096,
        )
        self.registry = Registry(self.redis, heartbeat_ttl=config.heartbeat_ttl_s, lease_s=config.reservation_lease_s)
        # One pooled client for all engines. No total timeout: a reasoning stream may
        # run for many minutes; the idle timeout is the longest silence allowed between chunks.
        self.engines = EngineClient(connect_timeout_s=config.engine_connect_timeout_s, idle_timeout_s=config.engine_idle_timeout_s)
        self.dispatcher = Dispatcher(config, self.registry, self.engines, self.metrics, {name: make_policy(name) for name in POLICIES})
        self.stats = AnswerStats(self.redis)
        self.pings = httpx.AsyncClient()  # round trips to each center (gateway.distance)
        self._keys: dict[str, tuple[float, dict[str, str] | None]] = {}
        self._key_lookups: dict[str, asyncio.Future] = {}

    async def authenticate(self, request: Request) -> dict[str, str]:
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not key:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        cached = self._keys.get(key)
        if cached and time.monotonic() - cached[0] < _KEY_CACHE_S:
            tenant = cached[1]
        else:
            # One lookup per key at a time: a burst of new requests shares it.
            lookup = self._key_lookups.get(key)
            if lookup is None:
                lookup = self._key_lookups[key] = asyncio.ensure_future(self.registry.lookup_api_key(key))
                lookup.add_done_callback(lambda _, key=key: self._key_lookups.pop(key, None))
            try:
                tenant = await asyncio.shield(lookup)
            except aioredis.RedisError:
                raise APIError(503, "fleet state is unavailable right now", code="redis_unavailable") from None
            self._keys[key] = (time.monotonic(), tenant)
        if tenant is None:
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")
        return tenant

    def forget_api_keys(self) -> None:
        """Look every key up afresh (one was revoked)."""
        self._keys.clear()

    async def forget_revoked_keys_forever(self) -> None:
        """Drop cached keys the moment any gateway revokes one (Redis pub/sub), so a
        leaked key stops working everywhere at once. Should a message be missed
        while the connection is down, the cache's few seconds still bound it."""
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(keys.API_KEYS_REVOKED)
                    self.forget_api_keys()  # anything revoked while we were not listening
                    while True:
                        if await pubsub.get_message(timeout=1.0) is not None:
                            self.forget_api_keys()
            except (aioredis.RedisError, OSError):  # Redis away: listen again once it is back
                await asyncio.sleep(1.0)

    async def housekeeping_forever(self) -> None:
        """Renew this gateway's reservation leases, share and refresh estimates, and
        measure the round trip to each center."""
        last_renew = last_ping = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(Exception):
                await self.dispatcher.retry_releases()
                await self.stats.flush()
                await self.stats.refresh()
                if time.monotonic() - last_renew > self.config.reservation_lease_s / 3:
                    await self.dispatcher.renew_leases()
                    last_renew = time.monotonic()
                if time.monotonic() - last_ping > _PING_EVERY_S:
                    last_ping = time.monotonic()
                    view = await self.dispatcher.snapshot()
                    await self.dispatcher.distances.measure(self.pings, view.workers)

    async def close(self) -> None:
        await self.dispatcher.close()
        with contextlib.suppress(Exception):
            await self.stats.flush()  # what the last second of answers taught
        await self.engines.close()
        await self.pings.aclose()
        await self.registry.close()
        await self.redis.aclose()


async def list_models(request: Request) -> JSONResponse:
    gw: Gateway = request.app.state.gateway
    await gw.authenticate(request)
    workers = [w for w in await gw.registry.workers() if w.state != GONE]
    models: dict[str, dict[str, Any]] = {}
    for w in workers:
        entry = models.setdefault(w.model, {"id": w.model, "object": "model", "created": 0, "owned_by": "idlegrid", "workers": 0, "simulated": True})
        entry["workers"] += 1
        entry["simulated"] = entry["simulated"] and w.engine_kind == "sim"
    for entry in models.values():
        if entry["simulated"]:
            entry["owned_by"] = "idlegrid-sim"
    return JSONResponse({"object": "list", "data": sorted(models.values(), key=lambda m: m["id"])})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> JSONResponse:
    """Ready = Redis answers and at least one worker can take work."""
    gw: Gateway = request.app.state.gateway
    try:
        workers = await gw.registry.workers()
    except aioredis.RedisError as exc:
        return JSONResponse({"status": "unavailable", "reason": f"redis: {exc}"}, status_code=503)
    n_ready = sum(w.state == READY for w in workers)
    status = 200 if n_ready else 503
    return JSONResponse({"status": "ready" if n_ready else "no_workers", "ready_workers": n_ready}, status_code=status)


async def metrics(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    with contextlib.suppress(aioredis.RedisError):
        workers = await gw.registry.workers()
        gw.metrics.inflight.clear()
        gw.metrics.workers.clear()
        counts: dict[str, int] = {}
        for w in workers:
            gw.metrics.inflight.labels(w.id, w.center).set(w.reserved_requests)
            counts[w.state] = counts.get(w.state, 0) + 1
        for state, n in counts.items():
            gw.metrics.workers.labels(state).set(n)
        gw.metrics.queue_depth.clear()
        # An empty queue reads 0, not "no series": autoscalers and alerts see every model.
        for model in {w.model for w in workers}:
            gw.metrics.queue_depth.labels(model, gw.config.center).set(0)
        for (model, center), n in (await gw.dispatcher.queue.depths()).items():
            gw.metrics.queue_depth.labels(model, center).set(n)
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(config: GatewayConfig) -> Starlette:
    gateway = Gateway(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        background = [asyncio.create_task(gateway.housekeeping_forever()),
                      asyncio.create_task(gateway.forget_revoked_keys_forever())]
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await gateway.close()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", serving.chat_completions, methods=["POST"]),
            Route("/v1/completions", serving.completions, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/ready", ready, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            *control.routes,
            *admin.routes,
        ],
        exception_handlers={
            APIError: api_error_handler,
            HTTPException: http_exception_handler,
            aioredis.RedisError: redis_error_handler,
            Exception: unhandled_error_handler,
        },
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app
