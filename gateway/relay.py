"""From an engine's SSE stream to the client's, keeping track of every token.

The gateway always asks engines to stream, with `return_token_ids` and usage,
whatever the client asked for. `Progress` records what the client has been
sent (prompt token ids, output token ids, where the reasoning ended), which is
exactly what is needed to resume the answer on another engine if this one
fails. `ClientStream` writes chunks in the client's own format (chat or
completions), with one stable id, whichever engine produced them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import httpx
import msgspec

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode

THINK_END = "</think>"


class EngineFailed(Exception):
    """The engine stopped before finishing the answer (connection, 5xx, abort, timeout)."""

    def __init__(self, reason: str, status: int = 502):
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass
class Piece:
    """One choice's step of output, normalized across chat and completions engines."""

    index: int = 0
    reasoning: str = ""
    content: str = ""
    token_ids: list[int] | None = None
    finish_reason: str | None = None
    delta_extra: dict[str, Any] | None = None  # e.g. role, tool_calls: passed through
    logprobs: Any = None


@dataclass
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


async def sse_events(response: httpx.Response) -> AsyncIterator[dict]:
    """Decoded JSON payloads of an SSE stream, ending at `[DONE]`."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        event = _decode(data)
        if "error" in event and "choices" not in event:
            raise EngineFailed(f"engine error: {event['error']}", 502)
        yield event


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
    out = []
    for choice in event.get("choices") or ():
        delta = dict(choice.get("delta") or {})
        reasoning = delta.pop("reasoning", None) or delta.pop("reasoning_content", None) or ""
        delta.pop("reasoning_content", None)
        content = delta.pop("content", None) or ""
        out.append(
            Piece(
                index=choice.get("index", 0),
                reasoning=reasoning,
                content=content,
                token_ids=choice.get("token_ids"),
                finish_reason=choice.get("finish_reason"),
                delta_extra=delta or None,
                logprobs=choice.get("logprobs"),
            )
        )
    return out


def pieces_from_completion(event: dict, splitter: ThinkSplitter | None) -> list[Piece]:
    out = []
    for choice in event.get("choices") or ():
        text = choice.get("text") or ""
        reasoning, content = splitter.split(text) if splitter else ("", text)
        out.append(
            Piece(
                index=choice.get("index", 0),
                reasoning=reasoning,
                content=content,
                token_ids=choice.get("token_ids"),
                finish_reason=choice.get("finish_reason"),
                logprobs=choice.get("logprobs"),
            )
        )
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

    def chunk(self, piece: Piece, prompt_token_ids: list[int] | None = None) -> dict:
        if self.kind == "chat":
            delta: dict[str, Any] = dict(piece.delta_extra or {})
            if piece.reasoning:
                delta["reasoning_content"] = piece.reasoning
            if piece.content or not delta:
                delta["content"] = piece.content
            choice: dict[str, Any] = {"index": piece.index, "delta": delta, "logprobs": piece.logprobs, "finish_reason": piece.finish_reason}
            obj = "chat.completion.chunk"
        else:
            # A completions client sees the raw text, reasoning tags and all.
            choice = {"index": piece.index, "text": piece.reasoning + piece.content, "logprobs": piece.logprobs, "finish_reason": piece.finish_reason}
            obj = "text_completion"
        if self.return_token_ids and piece.token_ids is not None:
            choice["token_ids"] = piece.token_ids
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}
        if self.return_token_ids and prompt_token_ids is not None:
            if self.kind == "chat":
                out["prompt_token_ids"] = prompt_token_ids
            else:
                choice["prompt_token_ids"] = prompt_token_ids
        return out

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}

    def usage_chunk(self, progress: Progress) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {
            "id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [],
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
                message: dict[str, Any] = {"role": "assistant", "content": content, "reasoning_content": reasoning or None}
                message.update(c["extra"])
                choices.append({"index": index, "message": message, "logprobs": None, "finish_reason": c["finish_reason"]})
            else:
                choices.append({"index": index, "text": reasoning + content, "logprobs": None, "finish_reason": c["finish_reason"]})
        obj = "chat.completion" if s.kind == "chat" else "text_completion"
        return {
            "id": s.id, "object": obj, "created": s.created, "model": s.model, "choices": choices,
            "usage": s.usage(progress.prompt_tokens or 0, progress.completion_tokens),
        }
