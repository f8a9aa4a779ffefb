"""One streaming chat completion, timed chunk by chunk.

We send `POST {base}/chat/completions` with `stream: true` and
`stream_options: {include_usage: true}`, and note the arrival time of every
SSE chunk that carries generated text. What counts as generated text:
`delta.content`, `delta.reasoning_content` (DeepSeek's field, which the
idlegrid gateway serves) and `delta.reasoning` (vLLM's own field, seen when
talking to an engine directly). A first chunk that only says
`role: assistant` is not a token, so it does not end the TTFT (unlike
`vllm bench serve`, which stops its TTFT clock at any first chunk).

The number of output tokens is `usage.completion_tokens` from the final chunk;
an endpoint that sends no usage falls back to one token per text chunk, and
the record says so (`output_tokens_from`).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

import httpx

from benchmarks.workloads import BenchRequest

WORKER_HEADER = "x-idlegrid-worker"  # which worker served it, when the gateway says so


@dataclass
class RequestRecord:
    """What one request did. Times are seconds; `start_s` is from the run's start."""

    index: int
    input_len: int  # intended prompt tokens
    max_tokens: int
    run: int = 0
    start_s: float = 0.0
    token_times_s: list[float] = field(default_factory=list)  # each text chunk, from send
    done_s: float | None = None  # stream closed, from send
    prompt_tokens: int | None = None  # from usage
    usage_output_tokens: int | None = None
    success: bool = False
    error_kind: str | None = None
    error: str = ""
    finish_reason: str | None = None
    worker: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] if self.token_times_s else None

    @property
    def e2el_s(self) -> float | None:
        """Send to last text chunk (the trailing usage chunk carries no token)."""
        return self.token_times_s[-1] if self.token_times_s else None

    @property
    def end_s(self) -> float:
        """When the request stopped occupying the endpoint, from the run's start."""
        last = self.done_s if self.done_s is not None else self.e2el_s
        return self.start_s + (last or 0.0)

    @property
    def itls_s(self) -> list[float]:
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def output_tokens(self) -> int:
        if self.usage_output_tokens is not None:
            return self.usage_output_tokens
        return len(self.token_times_s)

    @property
    def output_tokens_from(self) -> str:
        return "usage" if self.usage_output_tokens is not None else "chunks"

    def to_json(self) -> dict:
        """A line of requests.jsonl (milliseconds, like the summary)."""
        out = asdict(self)
        del out["token_times_s"]
        ms = lambda s: None if s is None else round(s * 1000, 3)  # noqa: E731
        out.update(
            start_ms=ms(self.start_s),
            ttft_ms=ms(self.ttft_s),
            e2el_ms=ms(self.e2el_s),
            itl_ms=[ms(g) for g in self.itls_s],
            output_tokens=self.output_tokens,
            output_tokens_from=self.output_tokens_from,
        )
        del out["start_s"], out["done_s"]
        return out


def chat_url(base_url: str) -> str:
    """`base_url` may be `http://host:port` or the OpenAI-style `http://host:port/v1`."""
    base = base_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return base + "/chat/completions"


def request_body(model: str, request: BenchRequest, ignore_eos: bool) -> dict:
    body = {
        "model": model,
        "messages": request.messages,
        "max_tokens": request.output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        # vLLM's extension: generate exactly max_tokens, so lengths are controlled.
        body["ignore_eos"] = True
    body.update(request.extra_body)
    return body


def _has_text(delta: dict) -> bool:
    return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"))


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error_message(body: str) -> str:
    """The message of an OpenAI-style error body (`{"error": {"message": ...}}`), else the body."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return _short(body)
    if isinstance(error, dict) and error.get("message"):
        return _short(str(error["message"]))
    return _short(body)


async def stream_chat(
    client: httpx.AsyncClient,
    url: str,
    headers: dict,
    body: dict,
    record: RequestRecord,
    run_t0: float,
) -> RequestRecord:
    """Send one request and fill in `record` as its stream arrives; never raises
    except `asyncio.CancelledError`, which leaves the record marked interrupted."""
    sent = time.perf_counter()
    record.start_s = sent - run_t0
    saw_done = False
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            record.worker = response.headers.get(WORKER_HEADER)
            if response.status_code != 200:
                record.error_kind = f"http_{response.status_code}"
                record.error = _error_message((await response.aread()).decode("utf-8", "replace"))
                return record
            async for line in response.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue  # blank separators, comments (pings), event names
                data = line[5:].strip()
                if data == "[DONE]":
                    saw_done = True
                    break
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    record.error_kind, record.error = "bad_chunk", _short(data)
                    return record
                if "error" in chunk:
                    record.error_kind, record.error = "stream_error", _error_message(data)
                    return record
                for choice in chunk.get("choices") or []:
                    if _has_text(choice.get("delta") or {}):
                        record.token_times_s.append(now - sent)
                        break
                for choice in chunk.get("choices") or []:
                    if choice.get("finish_reason"):
                        record.finish_reason = choice["finish_reason"]
                usage = chunk.get("usage")
                if usage:
                    record.prompt_tokens = usage.get("prompt_tokens", record.prompt_tokens)
                    record.usage_output_tokens = usage.get("completion_tokens", record.usage_output_tokens)
    except asyncio.CancelledError:
        record.error_kind, record.error = "interrupted", "the benchmark was stopped"
        raise
    except httpx.TimeoutException as exc:
        record.error_kind, record.error = "timeout", _short(repr(exc))
        return record
    except httpx.ConnectError as exc:
        record.error_kind, record.error = "connect_error", _short(str(exc) or repr(exc))
        return record
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        record.error_kind, record.error = "stream_broken", _short(str(exc) or repr(exc))
        return record
    except httpx.HTTPError as exc:
        record.error_kind, record.error = "http_error", _short(str(exc) or repr(exc))
        return record
    finally:
        record.done_s = time.perf_counter() - sent

    if record.finish_reason == "abort":
        record.error_kind, record.error = "aborted", "the engine aborted the request"
    elif not saw_done and record.finish_reason is None:
        record.error_kind, record.error = "stream_cut", "the stream ended without [DONE] or a finish_reason"
    elif not record.token_times_s:
        record.error_kind, record.error = "no_tokens", "the stream carried no generated text"
    else:
        record.success = True
    return record
