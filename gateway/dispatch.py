"""Placing a request on a worker and opening its engine stream.

`Job` is one client request in flight: what was asked, and what has been
delivered so far (`Progress`). `Dispatcher.start` finds room (policy +
atomic reservation, or a wait in the admission queue), opens the engine's
stream and retries other workers if an engine fails before the first byte. The
same call with `resume=True` continues a half-finished answer on another engine
from prompt + tokens already sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import anyio
from redis.exceptions import RedisError

from gateway.admission import AdmissionQueue
from gateway.config import GatewayConfig
from gateway.engine_client import EngineClient, EngineError, EngineStream, EngineTimeout
from gateway.errors import APIError
from gateway.fleet import GONE, READY, SLEEPING, STARTING, WAKING, RouteRequest, Worker
from gateway.distance import CenterDistances
from gateway.headroom import candidates, expected_wait_ms
from gateway.metrics import GatewayMetrics
from gateway.policies import Policy
from gateway.registry import Registry, Reservation, WorkerCache
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
    early_refused: bool = False  # an early start's reservation was refused: reserve first from now on
    answered_by: str | None = None  # the worker whose answer reached the client first
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
    """One engine stream serving (part of) a job, holding a reservation, or with
    one on its way (`reserving`: see EARLY_START_BELOW and Dispatcher.confirm)."""

    def __init__(self, worker: Worker, response: EngineStream, resumed: bool, job: Job, watched: set["Attempt"],
                 reserving: asyncio.Future | None = None):
        self.worker = worker
        self.request_id = job.request_id
        self.response = response
        self.resumed = resumed
        self.reserving = reserving  # the Reservation on its way; None once it is made
        self.held = reserving is None  # room is reserved for it (and must be released)
        self._watched = watched  # the dispatcher's open streams, which its watchdog looks at
        watched.add(self)
        self.from_chat = not resumed and job.kind == "chat"  # else the engine speaks completions
        # A resumed chat answer comes back as raw text: split reasoning ourselves.
        self.splitter = ThinkSplitter(job.progress.reasoning_open or not job.progress.content_started) if resumed and job.kind == "chat" else None
        self.engine_usage: dict | None = None
        self.last_event_at = time.monotonic()
        self.lost: str | None = None  # set by the watchdog when it gives up on the worker

    async def pieces(self, progress: Progress) -> AsyncIterator[list[Piece]]:
        """The engine's answer, the pieces of one network read at a time (see relay.sse_events)."""
        from_chat = self.from_chat
        try:
            async for events in sse_events(self.response.chunks()):
                self.last_event_at = time.monotonic()
                pieces: list[Piece] = []
                for event in events:
                    if progress.prompt_token_ids is None:
                        progress.prompt_token_ids = prompt_ids_of(event)
                    if event.get("usage"):
                        self.engine_usage = event["usage"]
                        if progress.prompt_tokens is None:
                            progress.prompt_tokens = event["usage"].get("prompt_tokens")
                    pieces += pieces_from_chat(event) if from_chat else pieces_from_completion(event, self.splitter)
                if pieces:
                    yield pieces
        except EngineTimeout as exc:
            raise EngineFailed(str(exc), 504) from exc
        except EngineError as exc:
            raise EngineFailed(self.lost or str(exc)) from exc
        if self.lost:
            raise EngineFailed(self.lost)

    async def close(self) -> None:
        # Closing the connection is what makes vLLM abort the request and free its slot.
        self.response.close()
        self._watched.discard(self)


# The fleet view requests are placed from is re-read in the background this often
# while the gateway is busy. Reservations are atomic in Redis, so a view this old
# costs at most one refused reservation (then a fresh read and another try).
FLEET_REFRESH_S = 0.05
# ... and not at all after this long without a request: an idle gateway costs Redis nothing.
FLEET_IDLE_S = 10.0
# A view older than this (background reads stopped or failing) is read on the request's path.
FLEET_MAX_AGE_S = 1.0
# A line of waiting requests looks at the queue at least this often: other gateways'
# releases, and requests leaving the queue, raise no event here.
LINE_POLL_S = 0.1
# Tries of the fast path (room now, nobody waiting) before a request joins the queue.
FAST_PATH_TRIES = 3
# An engine stream silent this long gets its worker looked at (see Dispatcher._watch_streams).
STREAM_SILENCE_S = 2.0
# A worker at most this full (sequences and KV, in the fleet view) is asked to start
# a request while the request's reservation is still on its way to Redis, and the
# reservation is confirmed just before the answer's first byte leaves for the
# client (Dispatcher.confirm). That far below its line the reservation all but
# always succeeds (it would take a burst from other gateways filling half the
# worker within one view refresh, or requests starting to queue), and the
# request's time to first token loses the Redis round trip: the engine's work
# and the gateway's own (response headers, parsing the first chunk) overlap it.
# When it is refused, the engine is hung up on as soon as Redis says so (it held
# the request for about a Redis round trip), and the client has seen nothing yet:
# the request is placed afresh. Nearer the line, room is reserved first and the
# engine asked after.
EARLY_START_BELOW = 0.5
# ... and only while at least this many sequences stay free with the request added:
# a burst at several gateways within one view refresh must not fill a small worker
# (max_num_seqs of a few) past its slots even for that round trip.
EARLY_START_MIN_FREE = 3
# A worker whose heartbeats stopped less than this long ago counts as gone (nothing
# is placed on it) but may only be late, on a host starved of CPU: a request with no
# other worker waits in the queue for it rather than hearing 503 at once.
LATE_HEARTBEAT_WAIT_S = 10.0


@dataclass
class FleetView:
    """The fleet as this gateway last read it from Redis."""

    workers: list[Worker]
    redis_time: float  # Redis' clock at the read
    read_at: float  # time.monotonic() at the read

    def now(self) -> float:
        """Redis' clock now, without asking it."""
        return self.redis_time + (time.monotonic() - self.read_at)


@dataclass
class Waiter:
    """A request waiting in the admission queue, and where it learns its worker."""

    job: Job
    policy: Policy
    placed: asyncio.Future  # the Worker with room reserved, or the error to answer


@dataclass
class Placement:
    """Where a request goes, with its room there reserved, or (`early`) still to reserve."""

    worker: Worker
    early: bool = False  # not reserved yet: the engine is asked, then Redis (see EARLY_START_BELOW)


class Line:
    """This gateway's requests waiting for one model, and the task that places them."""

    def __init__(self) -> None:
        self.waiters: dict[str, Waiter] = {}  # request id -> waiter
        self.wake = asyncio.Event()  # room may have appeared
        self.task: asyncio.Task | None = None


class Dispatcher:
    """Places requests on workers and opens their engine streams.

    A request that finds room and nobody waiting is placed at once: one policy
    choice over the fleet view and one atomic reservation. Otherwise it joins the
    admission queue in Redis (shared by all gateways) and awaits a future; one
    task per model (`_dispatch`) places this gateway's waiting requests, in queue
    order, whenever room may have appeared. The fleet view is kept fresh in the
    background, so placing a request does not wait on reading the fleet.
    """

    def __init__(self, config: GatewayConfig, registry: Registry, engines: EngineClient, metrics: GatewayMetrics, policies: dict[str, Policy]):
        self.config = config
        self.registry = registry
        self.engines = engines
        self.metrics = metrics
        self.policies = policies
        self.active: dict[str, str] = {}  # request id -> worker id, for lease renewal
        self.unreleased: set[tuple[str, str]] = set()  # releases Redis missed during an outage
        self.queue = AdmissionQueue(registry.redis)
        self.cache = WorkerCache(registry)
        self.distances = CenterDistances(config.center, config.center_rtt_ms)
        self.lines: dict[str, Line] = {}  # model -> its waiting requests
        self._view: FleetView | None = None
        self._reading: asyncio.Future | None = None  # the fleet read in flight, shared by its callers
        self._refresher: asyncio.Task | None = None
        self._wanted_at = 0.0  # when the fleet view was last asked for
        self.streams: set[Attempt] = set()  # open engine streams
        self._stream_watch: asyncio.Task | None = None

    # -- the fleet view ----------------------------------------------------

    async def snapshot(self) -> FleetView:
        """The fleet view to place requests on. Re-read in the background every
        FLEET_REFRESH_S while the gateway is busy; a request waits for Redis only
        when there is no recent view (first use, after idling, Redis away)."""
        self._wanted_at = time.monotonic()
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_while_busy())
        view = self._view
        if view is None or time.monotonic() - view.read_at > FLEET_MAX_AGE_S:
            view = await self.refresh()
        return view

    async def refresh(self, *, full: bool = False) -> FleetView:
        """Read the fleet now (`full`: every record, changed or not); callers at the
        same moment share one read."""
        if full:
            return await self._read(full=True)
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
            self._reading.add_done_callback(self._read_done)
        return await asyncio.shield(self._reading)

    def _read_done(self, reading: asyncio.Future) -> None:
        self._reading = None
        if not reading.cancelled():
            reading.exception()  # a failed read is reported to its callers, not logged as lost

    async def _read(self, full: bool = False) -> FleetView:
        workers, redis_time, changed = await self.cache.read(full=full)
        self._view = FleetView(workers, redis_time, time.monotonic())
        if changed:
            for line in self.lines.values():
                if line.waiters:
                    line.wake.set()
        return self._view

    async def _refresh_while_busy(self) -> None:
        try:
            while time.monotonic() - self._wanted_at < FLEET_IDLE_S:
                await asyncio.sleep(FLEET_REFRESH_S)
                try:
                    await self.refresh()
                except Exception as exc:  # Redis away: the view ages, and requests read (and fail) themselves
                    log.debug("fleet refresh failed: %r", exc)
        finally:
            self._refresher = None

    async def close(self) -> None:
        """Stop the background reads and the lines' tasks (the gateway is stopping)."""
        tasks = [t for t in (self._refresher, self._stream_watch, *(line.task for line in self.lines.values())) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- placing -----------------------------------------------------------

    async def place(self, job: Job) -> Placement:
        """Reserve room on a worker for `job`; wait in the admission queue while
        there is none, or others wait already, up to the queue timeout (then 429).
        At a worker far below its line the room is left to reserve after the
        engine is asked (see EARLY_START_BELOW)."""
        policy = self.policies.get(job.policy_name) or self.policies[self.config.policy]
        for _ in range(FAST_PATH_TRIES):
            view = await self.snapshot()
            pool = self._pool(job.route, job.excluded, view)
            if not pool:  # (a worker with room can serve it: no need to ask)
                await self._check_servable(job, view)
            choice = policy.choose(self._locate(job.route, view, pool), pool) if pool else None
            if choice is None:
                break
            if not job.early_refused and _far_below_line(choice, job.route):
                return Placement(choice, early=True)
            reservation = await self._reserve(job, choice, unless_queued=True)
            if reservation.ok:
                return Placement(choice)
            if reservation.reason == "queued":
                break
            await self.refresh()  # another gateway took that room: look again, freshly
        return Placement(await self._wait_in_line(job, policy))

    async def _wait_in_line(self, job: Job, policy: Policy) -> Worker:
        """Join the admission queue; the model's line places the request when its turn and room come."""
        model, request_id = job.model, job.request_id
        waiter = Waiter(job, policy, asyncio.get_running_loop().create_future())
        line = self.lines.setdefault(model, Line())
        placed: Worker | None = None
        try:
            await self._enqueue(job)
            line.waiters[request_id] = waiter
            if line.task is None:
                line.task = asyncio.create_task(self._dispatch(model, line))
            line.wake.set()  # room may have freed while we joined
            placed = await asyncio.wait_for(waiter.placed, self.config.queue_timeout_s)
            return placed
        except asyncio.TimeoutError:
            raise APIError(429, f"all workers serving '{model}' are busy; try again shortly", code="overloaded", headers={"Retry-After": "2"}) from None
        finally:
            line.waiters.pop(request_id, None)
            # Shielded: a client that disconnects while waiting leaves the line, and
            # room reserved for it in that same moment goes back.
            with anyio.CancelScope(shield=True):
                if placed is None and waiter.placed.done() and not waiter.placed.cancelled() and waiter.placed.exception() is None:
                    await self.release(job, waiter.placed.result())
                await self.queue.leave(model, request_id)

    async def _dispatch(self, model: str, line: Line) -> None:
        """Place this gateway's waiting requests for `model` whenever room may have
        appeared: a release here, a fleet read showing a change, and at least every
        LINE_POLL_S for what other gateways do. Ends when nobody waits."""
        try:
            while line.waiters:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(line.wake.wait(), LINE_POLL_S)
                line.wake.clear()
                waiting = [w for w in line.waiters.values() if not w.placed.done()]
                try:
                    await self._place_waiting(model, waiting, line)
                except Exception as exc:  # e.g. Redis away: answer the waiters (503) rather than keep them blind
                    log.warning("placing queued requests for %s failed: %r", model, exc)
                    for waiter in waiting:
                        if not waiter.placed.done():
                            waiter.placed.set_exception(exc)
        finally:
            line.task = None

    async def _place_waiting(self, model: str, waiting: list[Waiter], line: Line) -> None:
        """One pass over the line: place, in queue order, the waiting requests near
        enough the head of the shared queue to take the room there is."""
        if not waiting:
            return
        view = await self.snapshot()
        if self._doomed(model, waiting, view):
            view = await self.refresh(full=True)  # confirm before answering 404/503
            for waiter in self._doomed(model, waiting, view):
                waiter.placed.set_exception(_unservable(model, waiter.job.excluded, view))
            waiting = [w for w in waiting if not w.placed.done()]
        # Room for the smallest request bounds every request's pool: without any,
        # there is nothing to place and no need to ask Redis for places in line.
        room = len(self._pool(RouteRequest(model=model, prompt_tokens=0, max_output_tokens=0), set(), view))
        if not room or not waiting:
            return
        in_line: list[tuple[int, Waiter]] = []
        for waiter, rank in zip(waiting, await self.queue.ranks(model, [w.job.request_id for w in waiting])):
            if rank < 0:  # dropped from the queue (Redis restarted): back in line
                await self._enqueue(waiter.job)
            else:
                in_line.append((rank, waiter))
        in_line.sort(key=lambda entry: entry[0])
        placed = 0  # requests placed in this pass no longer stand ahead of the rest
        declined = 0  # ours ahead that chose to wait for room at home: they take none now
        for rank, waiter in in_line:
            ahead = rank - placed
            if ahead - declined >= room:
                break  # nobody further back may take room either
            job = waiter.job
            # A request takes room only when fewer requests that may take it stand ahead
            # than there are workers with room: it never passes one waiting at another gateway.
            pool = self._pool(job.route, job.excluded, view)
            if ahead - declined >= len(pool) or waiter.placed.done():
                continue
            # Everyone ahead waits for home's slots before it, so they count in its wait there.
            choice = waiter.policy.choose(self._locate(job.route, view, pool, ahead), pool)
            if choice is None:
                declined += 1
                continue
            reservation = await self._reserve(job, choice, unless_queued=False)
            if not reservation.ok:  # our view was behind: another pass, on a fresh one
                await self.refresh()
                line.wake.set()
                return
            placed += 1
            if waiter.placed.done() or line.waiters.get(job.request_id) is not waiter:
                await self.release(job, choice)  # its client left meanwhile
            else:
                waiter.placed.set_result(choice)

    def _locate(self, route: RouteRequest, view: FleetView, pool: list[Worker], ahead: int = 0) -> RouteRequest:
        """Add what a policy weighs before sending `route` away from the gateway's
        center to a worker in `pool`: the round trip to each center, and the wait
        for room at home behind the `ahead` requests queued before it."""
        if not route.center or all(w.center == route.center for w in pool):
            return route  # nowhere else to go
        route.center_rtt_ms = self.distances.table({w.center for w in view.workers})
        allowed = set(route.allowed_centers)
        home = [
            w for w in view.workers
            if w.center == route.center and w.model == route.model and w.state == READY
            and (not allowed or w.center in allowed)
        ]
        route.local_wait_ms = expected_wait_ms(home, route, ahead)
        return route

    def _pool(self, route: RouteRequest, excluded: set[str], view: FleetView) -> list[Worker]:
        """The workers with room for `route` now, as far as the view knows."""
        now = view.now()
        return [
            w for w in candidates(view.workers, route, now, heartbeat_ttl=self.config.heartbeat_ttl_s)
            if w.id not in excluded and float(w.extra.get("breaker_until") or 0) <= now
        ]

    async def _check_servable(self, job: Job, view: FleetView) -> None:
        """404 or 503 when no worker could serve `job` however long it waited;
        confirmed by a full read, since a view may not show a worker admitted just now."""
        if _unservable(job.model, job.excluded, view) is None:
            return
        error = _unservable(job.model, job.excluded, await self.refresh(full=True))
        if error is not None:
            raise error

    @staticmethod
    def _doomed(model: str, waiting: list[Waiter], view: FleetView) -> list[Waiter]:
        """The waiting requests no worker could serve however long they waited,
        judged once per set of excluded workers (most requests exclude none)."""
        verdicts: dict[frozenset[str], bool] = {}
        out = []
        for waiter in waiting:
            excluded = frozenset(waiter.job.excluded)
            if excluded not in verdicts:
                verdicts[excluded] = _unservable(model, excluded, view) is not None
            if verdicts[excluded]:
                out.append(waiter)
        return out

    async def _reserve(self, job: Job, worker: Worker, *, unless_queued: bool) -> Reservation:
        route = job.route
        reservation = await self.registry.reserve(
            worker, job.request_id, route.reserved_tokens, route.average_kv_tokens,
            unless_queued=job.model if unless_queued else None,
        )
        # Our copy of the worker takes the counts Redis found, so the next choice sees them.
        self.cache.note(worker.id, reservation.version, reservation.worker_fields())
        if reservation.ok:
            self.active[job.request_id] = worker.id
        return reservation

    async def _enqueue(self, job: Job) -> None:
        await self.queue.enqueue(
            job.model, job.request_id, priority=job.params.priority or 0,
            api_key=job.route.api_key_id, center=self.config.center, timeout_s=self.config.queue_timeout_s,
        )

    async def release(self, job: Job, worker: Worker) -> None:
        self.active.pop(job.request_id, None)
        try:
            reservation = await self.registry.release(worker.id, job.request_id)
        except Exception:
            # Redis is away: retry from housekeeping (the lease would expire anyway).
            self.unreleased.add((worker.id, job.request_id))
            return
        self.cache.note(worker.id, reservation.version, reservation.worker_fields())
        line = self.lines.get(job.model)
        if line is not None and line.waiters:
            line.wake.set()  # the room may suit a request waiting here

    async def retry_releases(self) -> None:
        for worker_id, request_id in list(self.unreleased):
            await self.registry.release(worker_id, request_id)
            self.unreleased.discard((worker_id, request_id))

    async def start(self, job: Job, *, resume: bool = False) -> Attempt:
        """Place `job` and open its engine stream, trying other workers on failure.
        The attempt's reservation may still be on its way (`confirm` settles it)."""
        last: EngineFailed | None = None
        failures = 0
        while failures < self.config.max_attempts:
            try:
                placement = await self.place(job)
            except APIError:
                if last is None:
                    raise
                break  # no other worker to try: report the engine failure itself
            worker = placement.worker
            reserving: asyncio.Future[Reservation] | None = None

            def reserve() -> None:
                # Called once the engine's request is written: Redis (often on this
                # same core) makes the reservation while the engine works, and nothing
                # waits on it until `confirm`.
                nonlocal reserving
                reserving = self.registry.reserve_now(worker, job.request_id, job.route.reserved_tokens,
                                                      job.route.average_kv_tokens, unless_queued=job.model)

            try:
                response = await self._ask_engine(job, worker, resume, sent=reserve if placement.early else None)
            except BaseException as exc:
                # The engine failed, refused, or the client left: neither its work nor the room is kept.
                with anyio.CancelScope(shield=True):
                    await self._settle(job, worker, reserving, held=not placement.early)
                if not isinstance(exc, EngineFailed):
                    raise
                last = exc
                failures += 1
                await self.worker_failed(job, worker)
                self.metrics.retries.labels(exc.reason.split(" ")[-1]).inc()
                continue
            attempt = Attempt(worker, response, resume, job, self.streams, reserving)
            if reserving is not None:
                reserving.add_done_callback(functools.partial(_hang_up_if_refused, response))
            if self._stream_watch is None:
                self._stream_watch = asyncio.create_task(self._watch_streams())
            return attempt
        assert last is not None
        raise APIError(last.status, f"engines failed before answering: {last.reason}", code="engine_failed")

    async def confirm(self, job: Job, attempt: Attempt) -> Attempt:
        """`attempt` once its reservation is made; called before the first byte of
        its answer leaves for the client. If Redis refused the room, the engine is
        hung up on and the request placed afresh (room first from now on): the
        attempt that serves it. Redis unreachable: RedisError, nothing held."""
        if attempt.reserving is None:
            return attempt
        try:
            try:
                # Shielded: a client that leaves now must not cut the call short, or
                # room Redis did reserve would stay taken until its lease ran out.
                reservation: Reservation = await asyncio.shield(attempt.reserving)
            except RedisError:
                # The call went out unguarded (see Registry.reserve_now): once more the
                # patient way, which reconnects (a retried reservation counts once).
                attempt.reserving = asyncio.ensure_future(self._reserve(job, attempt.worker, unless_queued=True))
                reservation = await asyncio.shield(attempt.reserving)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.finish(job, attempt)
            raise
        attempt.reserving = None
        # Our copy of the worker takes the counts Redis found, so the next choice sees them.
        self.cache.note(attempt.worker.id, reservation.version, reservation.worker_fields())
        if reservation.ok:
            self.active[job.request_id] = attempt.worker.id
            attempt.held = True
            return attempt
        job.early_refused = True
        await attempt.close()
        if reservation.reason != "queued":
            await self.refresh()  # another gateway took that room: look again, freshly
        return await self.start(job, resume=attempt.resumed)

    async def finish(self, job: Job, attempt: Attempt) -> None:
        """Hang up on the engine (which aborts its work if it is not done) and give
        the attempt's room back, once its reservation, if still on its way, lands."""
        await attempt.close()
        reserving, attempt.reserving = attempt.reserving, None
        held, attempt.held = attempt.held, False
        await self._settle(job, attempt.worker, reserving, held)

    async def _settle(self, job: Job, worker: Worker, reserving: asyncio.Future | None, held: bool) -> None:
        """Release the room `job` holds on `worker`, or that `reserving` makes."""
        if reserving is not None:
            with contextlib.suppress(Exception):  # Redis away: nothing was reserved that we know of
                held = (await asyncio.shield(reserving)).ok
        if held:
            await self.release(job, worker)

    async def _ask_engine(self, job: Job, worker: Worker, resume: bool, *, sent: Callable[[], None] | None = None) -> EngineStream:
        """Open the engine's stream: EngineFailed if the engine is at fault (another
        worker may do), APIError if it refuses the request itself (any would).
        `sent` is called once the request is written."""
        path, body = job.engine_request(resume)
        headers = {"X-Request-Id": job.request_id}
        if worker.engine_api_key:
            headers["Authorization"] = f"Bearer {worker.engine_api_key}"
        try:
            response = await self.engines.stream(worker.engine_url.rstrip("/") + path, body, headers, sent=sent)
        except EngineTimeout:
            raise EngineFailed(f"worker {worker.id} timed out", 504) from None
        except EngineError as exc:
            raise EngineFailed(f"worker {worker.id} {exc}", 502) from None
        if response.status < 400:
            return response
        try:
            detail = await response.read(2000)
        finally:
            response.close()
        if 400 <= response.status < 500 and response.status not in (404, 408, 429):
            # The engine refuses the request itself (e.g. prompt too long): the
            # client's problem, the same on any worker.
            raise APIError(response.status, _engine_message(detail), code="engine_rejected")
        raise EngineFailed(f"worker {worker.id} answered {response.status}", 502)

    async def worker_failed(self, job: Job, worker: Worker) -> None:
        """Keep this request off the worker, and count it toward its circuit breaker."""
        job.excluded.add(worker.id)
        try:
            if await self.registry.record_failure(worker.id):
                log.warning("circuit breaker open for worker %s: failing repeatedly", worker.id)
        except Exception:  # Redis trouble must not turn a retry into an error
            pass

    async def _watch_streams(self) -> None:
        """Watchdog for the open engine streams, one task for all of them: if an
        engine goes quiet and its worker stops heartbeating (or is revoked, or goes
        to sleep), give up on it without waiting for the long idle timeout, so the
        answer resumes elsewhere within seconds. Ends when no stream is open."""
        try:
            while self.streams:
                await asyncio.sleep(STREAM_SILENCE_S / 2)
                now = time.monotonic()
                silent = [a for a in self.streams if now - a.last_event_at >= STREAM_SILENCE_S]
                if not silent:
                    continue
                try:
                    view = await self.snapshot()
                except Exception as exc:  # Redis away: the engine's own idle timeout still applies
                    log.debug("stream watchdog could not read the fleet: %r", exc)
                    continue
                workers = {w.id: w for w in view.workers}
                for attempt in silent:
                    lost = _why_lost(workers.get(attempt.worker.id))
                    if lost:
                        attempt.lost = lost
                        attempt.response.close()  # its reader gets an engine failure and resumes elsewhere
                        self.streams.discard(attempt)
        finally:
            self._stream_watch = None

    async def renew_leases(self) -> None:
        by_worker: dict[str, list[str]] = {}
        for request_id, worker_id in list(self.active.items()):
            by_worker.setdefault(worker_id, []).append(request_id)
        for worker_id, request_ids in by_worker.items():
            await self.registry.renew(worker_id, request_ids)


def _hang_up_if_refused(response: EngineStream, reserving: asyncio.Future) -> None:
    """An early start whose room Redis refused: stop the engine's work on it at once
    (`confirm` then places the request again), so no engine holds a request past
    its slots for longer than the reservation's round trip."""
    if not reserving.cancelled() and reserving.exception() is None and not reserving.result().ok:
        response.close()


def _far_below_line(worker: Worker, route: RouteRequest) -> bool:
    """True when `worker`, with `route` added, is at most EARLY_START_BELOW full and
    has EARLY_START_MIN_FREE sequences left."""
    after = worker.reserved_requests + 1
    if after > EARLY_START_BELOW * worker.max_num_seqs or worker.max_num_seqs - after < EARLY_START_MIN_FREE:
        return False
    capacity = worker.kv_capacity_tokens
    return capacity <= 0 or worker.reserved_tokens + route.reserved_tokens <= EARLY_START_BELOW * capacity


def _unservable(model: str, excluded: set[str] | frozenset[str], view: FleetView) -> APIError | None:
    """Why no worker could serve a request for `model` (not on `excluded` workers)
    however long it waited, if none could."""
    workers = view.workers
    if any(w.state != GONE for w in workers) and not any(w.model == model for w in workers):
        return APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
    now = view.now()
    if any(w.model == model and w.id not in excluded and (w.state == READY or _ready_soon(w, now)) for w in workers):
        return None
    if not any(w.model == model and w.state != GONE for w in workers):
        return APIError(503, f"no worker is serving '{model}' right now", code="no_worker")
    return APIError(503, f"no worker is ready to serve '{model}'", code="no_worker")


def _ready_soon(worker: Worker, now: float) -> bool:
    """Will be ready within seconds with nobody's say: waking from sleep, held in
    `starting` only while the gateway qualifies it (not flagged, not cordoned), or
    gone only for heartbeats a few seconds late (see LATE_HEARTBEAT_WAIT_S). A
    request for it waits in the queue; one whose workers sleep, drain, are still
    loading their model or went silent long ago is told at once."""
    if worker.state == WAKING:
        return True
    if worker.state == GONE:
        return now - worker.last_heartbeat < LATE_HEARTBEAT_WAIT_S
    extra = worker.extra
    return (worker.state == STARTING and extra.get("reported_state") == READY
            and extra.get("flagged") != "1" and extra.get("cordoned") != "1")


def _why_lost(worker: Worker | None) -> str | None:
    """Why a silent stream's worker will not answer it, if it will not. A sleeping
    engine holds a request it received at the last moment until it wakes: resume
    it elsewhere instead."""
    if worker is None:
        return "worker left the fleet"
    if worker.state == GONE:
        return "worker heartbeat expired"
    if worker.state == SLEEPING:
        return "worker went to sleep"
    return None


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
    return os.urandom(16).hex()  # as random as uuid4().hex, without building a UUID on every request
