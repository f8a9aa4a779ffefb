"""Placing a request on a worker and opening its engine stream.

`Job` is one client request in flight: what was asked, and what has been
delivered so far (`Progress`). `Dispatcher.start` finds room (policy +
atomic reservation), opens the engine's stream and retries other workers if an
engine fails before the first byte. The same call with `resume=True` continues
a half-finished answer on another engine from prompt + tokens already sent.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import anyio
import httpx

from gateway.admission import AdmissionQueue
from gateway.config import GatewayConfig
from gateway.errors import APIError
from gateway.fleet import GONE, READY, SLEEPING, RouteRequest, Worker
from gateway.headroom import candidates
from gateway.metrics import GatewayMetrics
from gateway.policies import Policy
from gateway.registry import Registry
from gateway.relay import (
    ClientStream,
    EngineFailed,
    Piece,
    Progress,
    ThinkSplitter,
    pieces_from_chat,
    pieces_from_completion,
    prompt_ids_of,
    sse_events,
)
from gateway.schemas import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("idlegrid.gateway")

# Fields of the client's request that must not be copied into a resumed one.
_NOT_RESUMED = {
    "messages", "prompt", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n",
    "model", "return_token_ids", "logprobs", "top_logprobs", "echo", "user", "priority",
}


class CannotResume(Exception):
    """The answer broke mid-stream and cannot be continued exactly."""


@dataclass
class Job:
    kind: str  # "chat" | "completions"
    params: ChatCompletionRequest | CompletionRequest
    body: dict[str, Any]
    request_id: str
    route: RouteRequest
    client: ClientStream
    policy_name: str = ""
    progress: Progress = field(default_factory=Progress)
    excluded: set[str] = field(default_factory=set)  # workers that failed this request
    migrations: int = 0
    started_at: float = field(default_factory=time.monotonic)

    @property
    def model(self) -> str:
        return self.params.model

    def resume_blocker(self) -> str | None:
        """Why this answer cannot be continued on another engine, if it cannot."""
        p = self.progress
        if self.params.n != 1:
            return "n > 1"
        if self.body.get("response_format") or self.body.get("guided_json") or self.body.get("guided_regex") or self.body.get("structured_outputs"):
            return "structured output"
        if self.body.get("tools"):
            return "tool calls"
        if p.prompt_token_ids is None or p.tokens_untracked:
            return "the engine did not return token ids"
        return None

    def engine_request(self, resume: bool) -> tuple[str, dict[str, Any]]:
        """Path and body for the engine: always streamed, with token ids and usage."""
        if not resume:
            body = dict(self.body)
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
            body["return_token_ids"] = True
            path = "/v1/chat/completions" if self.kind == "chat" else "/v1/completions"
            return path, body
        p = self.progress
        body = {k: v for k, v in self.body.items() if k not in _NOT_RESUMED}
        body.update(
            model=self.model,
            prompt=list(p.prompt_token_ids or []) + p.output_token_ids,
            stream=True,
            stream_options={"include_usage": True},
            return_token_ids=True,
        )
        limit = self.params.output_limit
        if limit is not None:
            body["max_tokens"] = max(1, limit - p.completion_tokens)
        return "/v1/completions", body


class Attempt:
    """One engine stream serving (part of) a job, holding a reservation."""

    def __init__(self, worker: Worker, response: httpx.Response, resumed: bool, job: Job):
        self.worker = worker
        self.response = response
        self.resumed = resumed
        # A resumed chat answer comes back as raw text: split reasoning ourselves.
        self.splitter = ThinkSplitter(job.progress.reasoning_open or not job.progress.content_started) if resumed and job.kind == "chat" else None
        self.engine_usage: dict | None = None
        self.last_event_at = time.monotonic()
        self.lost: str | None = None  # set by the watchdog when it gives up on the worker

    async def pieces(self, progress: Progress) -> AsyncIterator[Piece]:
        from_chat = not self.resumed and "/chat/" in str(self.response.request.url)
        try:
            async for event in sse_events(self.response):
                self.last_event_at = time.monotonic()
                if progress.prompt_token_ids is None:
                    progress.prompt_token_ids = prompt_ids_of(event)
                if event.get("usage"):
                    self.engine_usage = event["usage"]
                    if progress.prompt_tokens is None:
                        progress.prompt_tokens = event["usage"].get("prompt_tokens")
                pieces = pieces_from_chat(event) if from_chat else pieces_from_completion(event, self.splitter)
                for piece in pieces:
                    yield piece
        except httpx.TimeoutException as exc:
            raise EngineFailed(f"engine went silent ({type(exc).__name__})", 504) from exc
        except httpx.HTTPError as exc:
            raise EngineFailed(self.lost or f"engine connection failed ({type(exc).__name__})") from exc
        if self.lost:
            raise EngineFailed(self.lost)

    async def close(self) -> None:
        # Closing the connection is what makes vLLM abort the request and free its slot.
        await self.response.aclose()


class Dispatcher:
    def __init__(self, config: GatewayConfig, registry: Registry, http: httpx.AsyncClient, metrics: GatewayMetrics, policies: dict[str, Policy]):
        self.config = config
        self.registry = registry
        self.http = http
        self.metrics = metrics
        self.policies = policies
        self.active: dict[str, str] = {}  # request id -> worker id, for lease renewal
        self.unreleased: set[tuple[str, str]] = set()  # releases Redis missed during an outage
        self.queue = AdmissionQueue(registry.redis)
        self._snapshot: tuple[list[Worker], float] | None = None
        self._snapshot_at = 0.0

    async def snapshot(self, max_age: float = 0.02) -> tuple[list[Worker], float]:
        """The fleet as Redis sees it, shared by all requests of this gateway for a
        few ms: reservations are checked atomically in Redis anyway, so a slightly
        old view costs at most one refused reservation."""
        if self._snapshot is None or time.monotonic() - self._snapshot_at > max_age:
            self._snapshot = (await self.registry.workers(), await self.registry.now())
            self._snapshot_at = time.monotonic()
        return self._snapshot

    async def place(self, job: Job) -> Worker:
        """Reserve room on a worker for `job`; wait in the admission queue while
        there is none, up to the queue timeout (then 429)."""
        policy = self.policies.get(job.policy_name) or self.policies[self.config.policy]
        deadline = time.monotonic() + self.config.queue_timeout_s
        model, rid = job.model, job.request_id
        queued = False
        max_age = 0.02
        try:
            while True:
                workers, now = await self.snapshot(max_age)
                max_age = 0.02
                serving = [w for w in workers if w.model == model and w.state != GONE]
                if not serving:
                    if any(w.state != GONE for w in workers) and not any(w.model == model for w in workers):
                        raise APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
                    raise APIError(503, f"no worker is serving '{model}' right now", code="no_worker")
                if not any(w.state == READY and w.id not in job.excluded for w in serving):
                    raise APIError(503, f"no worker is ready to serve '{model}'", code="no_worker")
                pool = [
                    w for w in candidates(workers, job.route, now, heartbeat_ttl=self.config.heartbeat_ttl_s)
                    if w.id not in job.excluded and float(w.extra.get("breaker_until") or 0) <= now
                ]
                if queued:
                    rank = await self.queue.rank(model, rid)
                    if rank < 0:  # dropped as stale (e.g. Redis restarted): get back in line
                        await self._enqueue(job)
                        rank = 0
                    may_try = bool(pool) and rank < len(pool)
                else:
                    # Fast path: room now and nobody waiting ahead of us.
                    may_try = bool(pool) and await self.queue.length(model) == 0
                if may_try:
                    choice = policy.choose(job.route, pool)
                    if choice is not None:
                        if await self.registry.reserve(choice, rid, job.route.reserved_tokens):
                            self.active[rid] = choice.id
                            return choice
                        max_age = 0.0  # another gateway took that room: look again, freshly
                        continue
                if not queued:
                    await self._enqueue(job)
                    queued = True
                if time.monotonic() > deadline:
                    raise APIError(429, f"all workers serving '{model}' are busy; try again shortly", code="overloaded", headers={"Retry-After": "2"})
                await asyncio.sleep(0.02 + random.random() * 0.01)
        finally:
            if queued:
                # Shielded: a client that disconnects while waiting leaves the line.
                with anyio.CancelScope(shield=True):
                    await self.queue.leave(model, rid)

    async def _enqueue(self, job: Job) -> None:
        await self.queue.enqueue(
            job.model, job.request_id, priority=job.params.priority or 0,
            api_key=job.route.api_key_id, center=self.config.center, timeout_s=self.config.queue_timeout_s,
        )

    async def release(self, job: Job, worker: Worker) -> None:
        self.active.pop(job.request_id, None)
        try:
            await self.registry.release(worker.id, job.request_id)
        except Exception:
            # Redis is away: retry from housekeeping (the lease would expire anyway).
            self.unreleased.add((worker.id, job.request_id))

    async def retry_releases(self) -> None:
        for worker_id, request_id in list(self.unreleased):
            await self.registry.release(worker_id, request_id)
            self.unreleased.discard((worker_id, request_id))

    async def start(self, job: Job, *, resume: bool = False) -> Attempt:
        """Place `job` and open its engine stream, trying other workers on failure."""
        last: EngineFailed | None = None
        for _ in range(self.config.max_attempts):
            try:
                worker = await self.place(job)
            except APIError:
                if last is None:
                    raise
                break  # no other worker to try: report the engine failure itself
            path, body = job.engine_request(resume)
            headers = {"X-Request-Id": job.request_id}
            if worker.engine_api_key:
                headers["Authorization"] = f"Bearer {worker.engine_api_key}"
            request = self.http.build_request("POST", worker.engine_url.rstrip("/") + path, json=body, headers=headers)
            try:
                response = await self.http.send(request, stream=True)
            except httpx.TimeoutException:
                last = EngineFailed(f"worker {worker.id} timed out", 504)
            except httpx.HTTPError as exc:
                last = EngineFailed(f"worker {worker.id} unreachable ({type(exc).__name__})", 502)
            else:
                if response.status_code < 400:
                    return Attempt(worker, response, resume, job)
                detail = (await response.aread())[:2000]
                await response.aclose()
                if 400 <= response.status_code < 500 and response.status_code not in (404, 408, 429):
                    # The engine refuses the request itself (e.g. prompt too long): the
                    # client's problem, the same on any worker.
                    await self.release(job, worker)
                    raise APIError(response.status_code, _engine_message(detail), code="engine_rejected")
                last = EngineFailed(f"worker {worker.id} answered {response.status_code}", 502)
            await self.release(job, worker)
            await self.worker_failed(job, worker)
            self.metrics.retries.labels(last.reason.split(" ")[-1] if last else "error").inc()
        assert last is not None
        raise APIError(last.status, f"engines failed before answering: {last.reason}", code="engine_failed")

    async def worker_failed(self, job: Job, worker: Worker) -> None:
        """Keep this request off the worker, and count it toward its circuit breaker."""
        job.excluded.add(worker.id)
        try:
            if await self.registry.record_failure(worker.id):
                log.warning("circuit breaker open for worker %s: failing repeatedly", worker.id)
        except Exception:  # Redis trouble must not turn a retry into an error
            pass

    async def watch(self, attempt: "Attempt", silence_s: float = 2.0) -> None:
        """Watchdog for one engine stream: if the engine goes quiet and its worker
        stops heartbeating (or is revoked), give up on it without waiting for the
        long idle timeout, so the answer resumes elsewhere within seconds."""
        while True:
            await asyncio.sleep(silence_s / 2)
            if time.monotonic() - attempt.last_event_at < silence_s:
                continue
            workers, _ = await self.snapshot(max_age=0.5)
            me = next((w for w in workers if w.id == attempt.worker.id), None)
            if me is None or me.state in (GONE, SLEEPING):
                # A sleeping engine holds a request it received at the last moment
                # until it wakes: resume it elsewhere instead.
                if me is None:
                    attempt.lost = "worker left the fleet"
                elif me.state == GONE:
                    attempt.lost = "worker heartbeat expired"
                else:
                    attempt.lost = "worker went to sleep"
                await attempt.response.aclose()
                return

    async def renew_leases(self) -> None:
        by_worker: dict[str, list[str]] = {}
        for request_id, worker_id in list(self.active.items()):
            by_worker.setdefault(worker_id, []).append(request_id)
        for worker_id, request_ids in by_worker.items():
            await self.registry.renew(worker_id, request_ids)


def _engine_message(detail: bytes) -> str:
    import json

    try:
        err = json.loads(detail)
        if isinstance(err, dict):
            inner = err.get("error", err)
            if isinstance(inner, dict) and inner.get("message"):
                return str(inner["message"])
            if isinstance(err.get("message"), str):
                return err["message"]
    except ValueError:
        pass
    return detail.decode(errors="replace") or "the engine rejected the request"


def new_request_id() -> str:
    return uuid.uuid4().hex
