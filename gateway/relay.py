"""From an engine's SSE stream to the client's, keeping track of every token.

The gateway always asks engines to stream, with `return_token_ids` and usage,
whatever the client asked for. `Progress` records what the client has been
sent (prompt token ids, output token ids, where the reasoning ended), which is
exactly what is needed to resume the answer on another engine if this one
fails. `ClientStream` writes chunks in the client's own format (chat or
completions), with one stable id, whichever engine produced them.

This is the gateway's hot path: every token of every answer passes through
here once. It works on bytes where it can (one split per network read, JSON
encoded around a prefix serialised once per answer), passes events on a
network read's worth at a time, and never holds the event loop for more than
a few dozen events at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import msgspec
from starlette.responses import Response

log = logging.getLogger("idlegrid.gateway")

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode

THINK_END = "</think>"

# An engine that has many events buffered (a burst, or a reader that fell
# behind) would otherwise be relayed without a single suspension, starving
# every other stream, Redis replies and heartbeats of this gateway.
EVENTS_PER_TURN = 32

_TEXT_KEYS = frozenset(("reasoning", "reasoning_content", "content"))


class EngineFailed(Exception):
    """The engine stopped before finishing the answer (connection, 5xx, abort, timeout)."""

    def __init__(self, reason: str, status: int = 502):
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(slots=True)
class Piece:
    """One choice's step of output, normalized across chat and completions engines."""

    index: int = 0
    reasoning: str = ""
    content: str = ""
    token_ids: list[int] | None = None
    finish_reason: str | None = None
    delta_extra: dict[str, Any] | None = None  # e.g. role, tool_calls: passed through
    logprobs: Any = None


@dataclass(slots=True)
class Progress:
    """What one request has delivered so far, across every engine it ran on."""

    prompt_token_ids: list[int] | None = None
    output_token_ids: list[int] = field(default_factory=list)
    reasoning_open: bool = False  # reasoning started and `</think>` not yet seen
    content_started: bool = False
    pieces_sent: int = 0
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens_untracked: bool = False  # an engine sent text without token ids

    @property
    def completion_tokens(self) -> int:
        return len(self.output_token_ids)

    def record(self, piece: Piece, now: float) -> None:
        if piece.token_ids:
            self.output_token_ids.extend(piece.token_ids)
        elif piece.reasoning or piece.content:
            self.tokens_untracked = True
        if piece.reasoning:
            self.reasoning_open = True
        if piece.content:
            self.content_started = True
            self.reasoning_open = False
        if piece.reasoning or piece.content or piece.token_ids:
            self.first_token_at = self.first_token_at or now
            self.last_token_at = now
        if piece.finish_reason:
            self.finish_reason = piece.finish_reason


def _event_data(block: bytes) -> bytes | None:
    """The data of one SSE event block (its `data:` lines joined), None if it has none."""
    if block[:6] == b"data: " and b"\n" not in block:
        return block[6:]  # what every engine sends: one data line
    lines = [line[5:] for line in block.split(b"\n") if line[:5] == b"data:"]
    if not lines:
        return None  # a comment (": ping"), or only event/id/retry fields
    return b"\n".join(line[1:] if line[:1] == b" " else line for line in lines)


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[dict]]:
    """Decoded JSON payloads of the SSE stream whose bytes `chunks` yields (as the
    network splits them), ending at `[DONE]`: the events of one network read
    together, at most EVENTS_PER_TURN at a time.

    Events come in batches because every layer an event passes through on its
    way to the client (here, the engine attempt, the answer, the client's
    stream) is an async generator, and each costs as much per item as the JSON
    work itself: passing them a read's worth at a time pays that once per read.

    A `data:` event with a top-level `error` (vLLM's way of saying its engine
    died mid-stream) and a payload that is not JSON are engine failures, raised
    after the events before them.
    """
    tail = b""
    turn = 0
    async for data in chunks:
        if tail:
            data = tail + data
        if b"\r" in data:  # SSE allows CRLF line ends; engines we know send LF
            data = data.replace(b"\r\n", b"\n")
        *blocks, tail = data.split(b"\n\n")
        batch: list[dict] = []
        for block in blocks:
            payload = _event_data(block)
            if payload is None:
                continue
            if payload.strip() == b"[DONE]":
                if batch:
                    yield batch
                await _finish_body(chunks)
                return
            try:
                event = _decode_event(payload)
            except EngineFailed:
                if batch:
                    yield batch
                raise
            batch.append(event)
            if len(batch) == EVENTS_PER_TURN:
                yield batch
                batch = []
                turn = 0
                await asyncio.sleep(0)  # let other streams and Redis replies through
        if batch:
            yield batch
            turn += len(batch)
            if turn >= EVENTS_PER_TURN:
                turn = 0
                await asyncio.sleep(0)


def _decode_event(payload: bytes) -> dict:
    try:
        event = _decode(payload)
    except msgspec.DecodeError:
        raise EngineFailed(f"engine sent an event that is not JSON: {payload[:100]!r}") from None
    if type(event) is not dict:
        raise EngineFailed(f"engine sent an event that is not a JSON object: {payload[:100]!r}")
    if "error" in event and "choices" not in event:
        raise EngineFailed(f"engine error: {event['error']}", 502)
    return event


class EventStreamResponse(Response):
    """A `text/event-stream` response of the bytes `chunks` yields, read ahead of the client.

    `chunks` runs in a task of its own from the moment the response is made, at
    most `max_pending_bytes` ahead of the client, so the engine's stream (and
    its reservation) ends when the engine is done, not when the client has read
    the last chunk. Chunks that are ready together go out in one write: at low
    load every chunk goes out alone, as soon as it is made; when the gateway
    falls behind, an engine's socket holds many events by the time it is read,
    and they are relayed in one write instead of one write (and one pass through
    the ASGI stack) each, so the cost per chunk falls as load rises instead of
    the queue growing. When `hangup` completes (the client left) or the response
    stops early, the task is cancelled and its cleanup (closing the engine stream
    frees the GPU slot, releasing the reservation) runs on its own.

    `first`, the answer's first chunk, goes out with the status line: the
    caller reads it from `chunks` itself, so that a request refused before its
    answer begins gets an error response with a status of its own.

    Starlette's StreamingResponse would do, but with an anyio task group and a
    listener task per response, which cost a noticeable share of a short
    request's CPU; `hangup` is the listener the request already has.
    """

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], *, hangup: asyncio.Future, headers: dict[str, str] | None = None,
                 max_pending_bytes: int = 1 << 16, first: bytes = b""):
        self.status_code = 200
        self.background = None
        self.init_headers(headers)
        self._pending: list[bytes] = [first] if first else []
        self._pending_bytes = len(first)
        self._ready = asyncio.Event()  # pending has something, or the producer ended
        self._room = asyncio.Event()  # the client took what was pending
        self._room.set()
        self._max_pending_bytes = max_pending_bytes
        self._hangup = hangup
        # Started now, before anything can cancel it: a task cancelled before its first
        # step never runs `chunks`' cleanup.
        self._producer = asyncio.ensure_future(self._produce(chunks))
        hangup.add_done_callback(self._stop)

    async def _produce(self, chunks: AsyncIterator[bytes]) -> None:
        try:
            async for chunk in chunks:
                self._pending.append(chunk)
                self._pending_bytes += len(chunk)
                self._ready.set()
                if self._pending_bytes >= self._max_pending_bytes:
                    self._room.clear()
                    await self._room.wait()
        finally:
            self._ready.set()

    def _stop(self, _: asyncio.Future | None = None) -> None:
        producer = self._producer
        if not producer.done() and producer not in _stopping:
            producer.cancel()  # once: a second cancel would interrupt its cleanup
            _stopping.add(producer)  # kept alive until its cleanup is done
            producer.add_done_callback(_forget)
        self._ready.set()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            while not self._hangup.done():
                if self._pending:
                    batch = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
                    self._pending.clear()
                    self._pending_bytes = 0
                    self._room.set()
                    await send({"type": "http.response.body", "body": batch, "more_body": True})
                elif self._producer.done():
                    self._producer.result()  # re-raises what ended the producer, if anything did
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                else:
                    await self._ready.wait()
                    self._ready.clear()
        finally:
            self._hangup.cancel()  # the request is over: stop listening (and stop the producer)
            self._stop()


_stopping: set[asyncio.Future] = set()  # producers being cancelled: keep them alive until done


def _forget(task: asyncio.Future) -> None:
    _stopping.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("cleanup of an abandoned stream failed: %r", task.exception())


async def _finish_body(chunks: AsyncIterator[bytes], within_s: float = 1.0) -> None:
    """Read the end of the HTTP body after `[DONE]` (the last, empty chunk). A body
    read to its end puts the connection back in the pool; one closed early costs
    the next request a new connection to the engine."""
    timeout = getattr(asyncio, "timeout", None)  # Python 3.11+
    if timeout is None:
        return
    try:
        async with timeout(within_s):
            async for _ in chunks:
                pass
    except Exception:  # noqa: BLE001 - the connection is closed instead of reused: no harm done
        pass


class ThinkSplitter:
    """Splits raw completion text into reasoning and answer at `</think>`, the way
    vLLM's deepseek_r1 reasoning parser does, for answers resumed through
    /v1/completions (which has no reasoning parser)."""

    def __init__(self, in_reasoning: bool):
        self.in_reasoning = in_reasoning

    def split(self, text: str) -> tuple[str, str]:
        if not self.in_reasoning:
            return "", text
        if THINK_END in text:
            reasoning, content = text.split(THINK_END, 1)
            self.in_reasoning = False
            return reasoning, content
        return text, ""


def pieces_from_chat(event: dict) -> list[Piece]:
    """Pieces of a chat chunk; vLLM's `delta.reasoning` (or DeepSeek's
    `reasoning_content`) becomes `Piece.reasoning`; other delta keys pass through."""
    out = []
    for choice in event.get("choices") or ():
        delta = choice.get("delta") or {}
        reasoning = delta.get("reasoning") or delta.get("reasoning_content") or ""
        content = delta.get("content") or ""
        extra = None
        if not _TEXT_KEYS.issuperset(delta):
            extra = {k: v for k, v in delta.items() if k not in _TEXT_KEYS}
        out.append(Piece(choice.get("index", 0), reasoning, content, choice.get("token_ids"),
                         choice.get("finish_reason"), extra, choice.get("logprobs")))
    return out


def pieces_from_completion(event: dict, splitter: ThinkSplitter | None) -> list[Piece]:
    out = []
    for choice in event.get("choices") or ():
        text = choice.get("text") or ""
        reasoning, content = splitter.split(text) if splitter else ("", text)
        out.append(Piece(choice.get("index", 0), reasoning, content, choice.get("token_ids"),
                         choice.get("finish_reason"), None, choice.get("logprobs")))
    return out


def prompt_ids_of(event: dict) -> list[int] | None:
    """vLLM puts prompt ids at the top of the first chat chunk, and on the choice
    for completions."""
    ids = event.get("prompt_token_ids")
    if ids is None:
        for choice in event.get("choices") or ():
            ids = choice.get("prompt_token_ids")
            if ids is not None:
                break
    return ids


class ClientStream:
    """Writes chunks in the client's format with one id for the whole answer."""

    def __init__(self, kind: str, model: str, request_id: str, *, include_usage: bool, return_token_ids: bool):
        self.kind = kind  # "chat" | "completions"
        self.model = model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self.created = int(time.time())
        self.include_usage = include_usage
        self.return_token_ids = return_token_ids
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"
        head = _encode({"id": self.id, "object": self.object, "created": self.created, "model": self.model})
        # `data: {"id":…,"model":…,"choices":[` — the bytes every chunk of this answer starts with.
        self._prefix = b"data: " + head[:-1] + b',"choices":['

    def chunk(self, piece: Piece, prompt_token_ids: list[int] | None = None) -> dict:
        choice: dict[str, Any] = self._choice(piece)
        out = {"id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": [choice]}
        if self.return_token_ids and prompt_token_ids is not None:
            if self.kind == "chat":
                out["prompt_token_ids"] = prompt_token_ids
            else:
                choice["prompt_token_ids"] = prompt_token_ids
        return out

    def event(self, piece: Piece, prompt_token_ids: list[int] | None = None) -> bytes:
        """`sse(chunk(piece, prompt_token_ids))`, byte for byte, without building the chunk."""
        choice = self._choice(piece)
        if self.return_token_ids and prompt_token_ids is not None:
            if self.kind == "chat":
                return self._prefix + _encode(choice) + b'],"prompt_token_ids":' + _encode(prompt_token_ids) + b"}\n\n"
            choice["prompt_token_ids"] = prompt_token_ids
        return self._prefix + _encode(choice) + b"]}\n\n"

    def _choice(self, piece: Piece) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = dict(piece.delta_extra) if piece.delta_extra else {}
            if piece.reasoning:
                delta["reasoning_content"] = piece.reasoning
            if piece.content or not delta:
                delta["content"] = piece.content
            choice: dict[str, Any] = {"index": piece.index, "delta": delta, "logprobs": piece.logprobs, "finish_reason": piece.finish_reason}
        else:
            # A completions client sees the raw text, reasoning tags and all.
            choice = {"index": piece.index, "text": piece.reasoning + piece.content, "logprobs": piece.logprobs, "finish_reason": piece.finish_reason}
        if self.return_token_ids and piece.token_ids is not None:
            choice["token_ids"] = piece.token_ids
        return choice

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}

    def usage_chunk(self, progress: Progress) -> dict:
        return {
            "id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": [],
            "usage": self.usage(progress.prompt_tokens or 0, progress.completion_tokens),
        }

    @staticmethod
    def sse(obj: dict) -> bytes:
        return b"data: " + _encode(obj) + b"\n\n"

    @staticmethod
    def error_event(message: str, code: str) -> bytes:
        return b"data: " + _encode({"error": {"message": message, "type": "server_error", "param": None, "code": code}}) + b"\n\n"

    DONE = b"data: [DONE]\n\n"


class Collector:
    """Builds a non-streaming response from the pieces of a streamed answer."""

    def __init__(self, stream: ClientStream):
        self.stream = stream
        self.choices: dict[int, dict[str, Any]] = {}

    def add(self, piece: Piece) -> None:
        c = self.choices.setdefault(piece.index, {"reasoning": [], "content": [], "finish_reason": None, "extra": {}})
        c["reasoning"].append(piece.reasoning)
        c["content"].append(piece.content)
        if piece.delta_extra:
            for k, v in piece.delta_extra.items():
                if k != "role":
                    c["extra"][k] = v
        if piece.finish_reason:
            c["finish_reason"] = piece.finish_reason

    def response(self, progress: Progress) -> dict:
        s = self.stream
        choices = []
        for index in sorted(self.choices):
            c = self.choices[index]
            reasoning, content = "".join(c["reasoning"]), "".join(c["content"])
            if s.kind == "chat":
                # As vLLM's reasoning parser answers: no text after the reasoning is
                # null content (e.g. cut off by max_tokens while still thinking).
                message: dict[str, Any] = {"role": "assistant", "content": content or (None if reasoning else ""),
                                           "reasoning_content": reasoning or None}
                message.update(c["extra"])
                choices.append({"index": index, "message": message, "logprobs": None, "finish_reason": c["finish_reason"]})
            else:
                choices.append({"index": index, "text": reasoning + content, "logprobs": None, "finish_reason": c["finish_reason"]})
        obj = "chat.completion" if s.kind == "chat" else "text_completion"
        return {
            "id": s.id, "object": obj, "created": s.created, "model": s.model, "choices": choices,
            "usage": s.usage(progress.prompt_tokens or 0, progress.completion_tokens),
        }
