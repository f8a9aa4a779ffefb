"""The OpenAI surface: a request's whole way through the gateway, in one place.

    auth → read + validate → place on a worker (policy, atomic reservation) →
    relay the engine's stream (tracking token ids) → on engine failure resume
    elsewhere from prompt + tokens already sent → release when the engine is
    done → account; the client reads the rest of the answer at its own pace.

A client that hangs up at any point (waiting for room, or mid-answer) stops
the work at once and frees its GPU slot: one task per request listens for it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Awaitable, TypeVar

import anyio
import msgspec
from redis.exceptions import RedisError

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from gateway.dispatch import Attempt, CannotResume, Job, new_request_id
from gateway.errors import APIError
from gateway.fleet import RouteRequest
from gateway.relay import ClientStream, Collector, EngineFailed, EventStreamResponse, Piece
from gateway.schemas import ChatCompletionRequest, CompletionRequest, parse_body

MAX_MIGRATIONS = 3
# Bytes of a streamed answer that may wait for the client. The engine's stream is
# read this far ahead of the client, so its reservation ends when the engine is
# done, not when a slow client (or a lagging relay) has taken the last chunk: a
# slot held past the engine's end is capacity the queue cannot use. Bounded, so a
# client that stops reading holds at most this much here (~4,000 chunks).
CLIENT_BUFFER_BYTES = 1 << 20
_MODELS = {"chat": ChatCompletionRequest, "completions": CompletionRequest}
T = TypeVar("T")


async def chat_completions(request: Request) -> Response:
    return await serve(request, "chat")


async def completions(request: Request) -> Response:
    return await serve(request, "completions")


async def serve(request: Request, kind: str) -> Response:
    gw = request.app.state.gateway
    request_id = request.headers.get("x-request-id") or new_request_id()
    headers = {"X-Request-Id": request_id}
    try:
        tenant = await gw.authenticate(request)
        body = await read_json(request, gw.config.max_body_bytes)
        params = parse_body(_MODELS[kind], body)
        job = Job(
            kind=kind,
            params=params,
            body=body,
            request_id=request_id,
            route=route_request(params, gw, tenant),
            client=ClientStream(
                kind, params.model, request_id,
                include_usage=bool(params.stream_options and params.stream_options.include_usage),
                return_token_ids=bool(params.return_token_ids),
            ),
            policy_name=tenant.get("policy", ""),
        )
    except (APIError, RedisError) as exc:
        return refusal(gw, kind, exc, headers)
    # Done when the client hangs up; the body is read, so nothing else is left to receive.
    hangup = asyncio.ensure_future(_client_gone(request))
    try:
        attempt = await unless_client_leaves(hangup, gw.dispatcher.start(job))
        if hangup.done():  # it won the race by a hair: give the room back
            await gw.dispatcher.finish(job, attempt)
            raise ClientLeft
        gw.log.info("request %s %s model=%s worker=%s", request_id, kind, params.model, attempt.worker.id)
        if not params.stream:
            return await collect_answer(gw, job, attempt, hangup, headers)
        # The first chunk is read here, in the request's task, before the response
        # exists: until it is ready the request may still be refused (see
        # Dispatcher.confirm), and the client then gets the refusal's own status, not
        # a 200 stream with an error in it.
        chunks = stream_answer(gw, job, attempt)
        first = await unless_client_leaves(hangup, anext(chunks))
        if hangup.done():
            await chunks.aclose()  # closing it hangs up on the engine and frees the slot
            raise ClientLeft
    except ClientLeft:
        gw.metrics.requests.labels(kind, "499").inc()
        return Response(status_code=499, headers=headers)
    except (APIError, RedisError) as exc:
        hangup.cancel()
        return refusal(gw, kind, exc, headers)
    except BaseException:
        hangup.cancel()
        raise
    headers["X-Idlegrid-Worker"] = job.answered_by or attempt.worker.id  # lets benchmarks attribute tokens per worker
    # The rest of the answer is read ahead of the client, and chunks that are ready
    # together go out in one write (see relay.EventStreamResponse).
    return EventStreamResponse(chunks, first=first, hangup=hangup, headers=headers, max_pending_bytes=CLIENT_BUFFER_BYTES)


def refusal(gw: Any, kind: str, exc: APIError | RedisError, headers: dict[str, str]) -> Response:
    """The error response for a request the gateway cannot serve (Redis away: 503)."""
    if isinstance(exc, RedisError):
        exc = APIError(503, "fleet state is unavailable right now; retry shortly", code="redis_unavailable", headers={"Retry-After": "1"})
    gw.metrics.requests.labels(kind, str(exc.status)).inc()
    exc.headers.update(headers)
    return exc.response()


class ClientLeft(Exception):
    """The client hung up before its answer began."""


async def unless_client_leaves(hangup: asyncio.Future, work: Awaitable[T]) -> T:
    """`work`, awaited in the request's own task, which the client hanging up
    cancels: ClientLeft then (a client waiting in the admission queue leaves it;
    one waiting for its first chunk hangs up on the engine). In the request's own
    task because a task of its own would cost every request a turn of the event
    loop before the engine is asked."""
    task = asyncio.current_task()
    assert task is not None
    waiting = True

    def stop(_: asyncio.Future) -> None:
        if waiting:  # a callback that comes after we are done must not cancel what follows
            task.cancel()

    hangup.add_done_callback(stop)
    try:
        return await work
    except asyncio.CancelledError:
        if not hangup.done():
            raise  # we are cancelled ourselves: the server is stopping
        task.uncancel()
        raise ClientLeft from None
    finally:
        waiting = False
        hangup.remove_done_callback(stop)


def route_request(params: ChatCompletionRequest | CompletionRequest, gw: Any, tenant: dict[str, str]) -> RouteRequest:
    prompt = params.prompt_text()
    # Counted from characters, at the ratio the model's engines have shown (see
    # AnswerStats.prompt_tokens): close enough for reservations; the engine counts exactly.
    token_ids = _token_ids(params)
    prompt_tokens = len(params.prompt) if token_ids else gw.stats.prompt_tokens(params.model, len(prompt))
    allowed = tuple(c for c in tenant.get("allowed_centers", "").split(",") if c)
    return RouteRequest(
        model=params.model,
        prompt_tokens=prompt_tokens,
        max_output_tokens=gw.stats.expected_output_tokens(params.model, params.output_limit, gw.config.default_output_tokens),
        prefix_key=prompt[:2048],
        prompt_chars=0 if token_ids else len(prompt),
        center=gw.config.center,
        allowed_centers=allowed,
        api_key_id=tenant.get("name", ""),
    )


def _token_ids(params: ChatCompletionRequest | CompletionRequest) -> bool:
    if not isinstance(params, CompletionRequest):
        return False  # a chat request has no prompt
    prompt = params.prompt
    return isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)


async def read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is larger than {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body is larger than {limit} bytes", code="body_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "client disconnected while sending the body") from None
    try:
        return msgspec.json.decode(chunks[0] if len(chunks) == 1 else b"".join(chunks))
    except msgspec.DecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None


async def answer_pieces(gw: Any, job: Job, attempt: Attempt) -> AsyncIterator[list[Piece]]:
    """Every piece of the answer, resuming on another engine if one fails; the
    pieces that arrived together come together.

    An attempt's first pieces wait for its reservation if that is still on its
    way (see Dispatcher.confirm); refused, the request starts afresh elsewhere
    before anything reached the client. Releases the reservation it holds as
    soon as the engine's stream ends (its consumer reads ahead of the client:
    see CLIENT_BUFFER_BYTES), and at once when the client goes away (the
    generator is closed, and closing the engine stream aborts the work).
    """
    progress = job.progress
    try:
        while True:
            try:
                engine_pieces = attempt.pieces(progress)
                async for pieces in engine_pieces:
                    if attempt.reserving is not None:
                        confirmed = await _confirm(gw, job, attempt)
                        if confirmed is not attempt:  # refused and placed again: start over there
                            await engine_pieces.aclose()
                            attempt = confirmed
                            break
                    job.answered_by = job.answered_by or attempt.worker.id
                    now = time.monotonic()
                    for i, piece in enumerate(pieces):
                        if piece.finish_reason == "abort":
                            # The engine was paused or stopped under us: not an answer's end.
                            piece.finish_reason = None
                            progress.record(piece, now)
                            kept = pieces[: i + 1] if piece.reasoning or piece.content or piece.delta_extra else pieces[:i]
                            if kept:
                                yield kept
                            raise EngineFailed("engine aborted the request")
                        progress.record(piece, now)
                    yield pieces
                else:  # the engine's stream ended
                    if progress.finish_reason is None:
                        raise EngineFailed("engine stream ended without finishing")
                    return
            except EngineFailed as failure:
                if attempt.reserving is not None:
                    # Not confirmed yet: the stream may have been cut because Redis refused the room.
                    confirmed = await _confirm(gw, job, attempt)
                    if confirmed is not attempt:
                        attempt = confirmed
                        continue
                await gw.dispatcher.finish(job, attempt)
                await gw.dispatcher.worker_failed(job, attempt.worker)
                blocker = job.resume_blocker() if progress.completion_tokens or progress.tokens_untracked else None
                if blocker or job.migrations >= MAX_MIGRATIONS:
                    raise CannotResume(f"worker failed mid-answer ({failure.reason}); cannot resume: {blocker or 'too many attempts'}")
                job.migrations += 1
                gw.metrics.migrations.labels(failure.reason.split(" (")[0]).inc()
                gw.log.warning("request %s: %s on %s; resuming after %d tokens", job.request_id, failure.reason, attempt.worker.id, progress.completion_tokens)
                try:
                    attempt = await gw.dispatcher.start(job, resume=progress.completion_tokens > 0)
                except APIError as exc:
                    raise CannotResume(f"worker failed mid-answer and no other could continue: {exc.message}") from None
    finally:
        # Shielded: when the client disconnects we are being cancelled, and these
        # awaits are what abort the engine's work and free the slot.
        with anyio.CancelScope(shield=True):
            await gw.dispatcher.finish(job, attempt)
        account(gw, job, attempt.worker.id)


async def _confirm(gw: Any, job: Job, attempt: Attempt) -> Attempt:
    try:
        return await gw.dispatcher.confirm(job, attempt)
    except (APIError, RedisError) as exc:
        if job.answered_by is None:
            raise  # the client has seen nothing: it gets this error's status
        message = exc.message if isinstance(exc, APIError) else "fleet state is unavailable"
        raise CannotResume(f"worker failed mid-answer and no other could continue: {message}") from None


async def stream_answer(gw: Any, job: Job, attempt: Attempt) -> AsyncIterator[bytes]:
    """The answer as SSE bytes. A request refused (APIError, RedisError) or left by
    its client before the answer began is answered and counted by `serve`."""
    client = job.client
    status: str | None = None  # set once the answer has begun
    first = True
    try:
        async for pieces in answer_pieces(gw, job, attempt):
            # The prompt's token ids go with the first chunk, as vLLM sends them.
            prompt_ids = job.progress.prompt_token_ids if first else None
            first, status = False, "200"
            yield b"".join([client.event(pieces[0], prompt_ids), *(client.event(piece) for piece in pieces[1:])])
        status = "200"
        if client.include_usage:
            yield client.sse(client.usage_chunk(job.progress))
    except CannotResume as exc:
        status = "502"
        yield client.error_event(str(exc), "engine_failed")
    finally:
        if status is not None:
            gw.metrics.requests.labels(job.kind, status).inc()
    yield client.DONE


async def collect_answer(gw: Any, job: Job, attempt: Attempt, hangup: asyncio.Future, headers: dict[str, str]) -> Response:
    """A non-streaming answer, built from the stream; stops the engine work if the
    client hangs up while it waits."""
    collector = Collector(job.client)

    async def collect() -> None:
        async for pieces in answer_pieces(gw, job, attempt):
            for piece in pieces:
                collector.add(piece)

    work = asyncio.ensure_future(collect())
    # The client left: free the GPU slot now. (Not when we stop listening ourselves, below.)
    hangup.add_done_callback(lambda gone: gone.cancelled() or work.cancel())
    try:
        await work
    except asyncio.CancelledError:
        if not hangup.done():
            raise  # we are cancelled ourselves: the server is stopping
        gw.metrics.requests.labels(job.kind, "499").inc()
        return Response(status_code=499)
    except CannotResume as exc:
        gw.metrics.requests.labels(job.kind, "502").inc()
        return APIError(502, str(exc), code="engine_failed", headers=headers).response()
    except (APIError, RedisError) as exc:  # refused before any answer (see Dispatcher.confirm)
        return refusal(gw, job.kind, exc, headers)
    finally:
        hangup.cancel()
    gw.metrics.requests.labels(job.kind, "200").inc()
    headers["X-Idlegrid-Worker"] = job.answered_by or attempt.worker.id
    return JSONResponse(collector.response(job.progress), headers=headers)


async def _client_gone(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def account(gw: Any, job: Job, worker_id: str) -> None:
    """Latency and token metrics for one finished (or abandoned) answer, and
    what it teaches the shared estimates (answer length, the worker's speed)."""
    p = job.progress
    m = gw.metrics
    tpot = None
    if p.first_token_at is not None:
        m.ttft.labels(job.model).observe(p.first_token_at - job.started_at)
        if p.completion_tokens > 1 and p.last_token_at is not None:
            tpot = (p.last_token_at - p.first_token_at) / (p.completion_tokens - 1)
            m.tpot.labels(job.model).observe(tpot)
    finished = p.finish_reason in ("stop", "length") and job.migrations == 0
    gw.stats.observe(job.model, worker_id, p.completion_tokens, tpot * 1000 if tpot and finished else None, p.finish_reason == "stop",
                     prompt_chars=0 if job.migrations else job.route.prompt_chars,
                     prompt_tokens=p.prompt_tokens)
    m.tokens.labels(job.model, "prompt").inc(p.prompt_tokens or 0)
    m.tokens.labels(job.model, "completion").inc(p.completion_tokens)
