"""vLLM 0.32's OpenAI wire format, as the simulated engine speaks it.

Requests are validated into pydantic models (unknown fields allowed, as in
vLLM); responses and stream chunks are plain dicts whose keys, order and nulls
follow what vLLM's pydantic models serialise to (`model_dump_json(
exclude_unset=True)` for chunks, `model_dump()` for whole responses), so a
client cannot tell the two apart by shape. Where the simulated engine does less
than vLLM (n > 1, logprobs, echo, batched prompts) it says so with a 400.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .tokens import END_THINK, THINK

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class RequestError(Exception):
    """A request vLLM would answer with an error status, in OpenAI's shape."""

    def __init__(self, message: str, *, status: int = 400, err_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.err_type, self.param = message, status, err_type, param

    @classmethod
    def invalid(cls, message: str, parameter: str | None = None, value: Any = None) -> RequestError:
        """What vLLM's VLLMValidationError says: the message, then "(parameter=..., value=...)"."""
        extras = [f"{k}={v}" for k, v in (("parameter", parameter), ("value", value)) if v is not None]
        return cls(f"{message} ({', '.join(extras)})" if extras else message, param=parameter)

    def body(self) -> dict:
        return error_body(self.message, self.err_type, self.status, self.param)


def error_body(message: str, err_type: str, code: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


# --- requests ---------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class _Generate(BaseModel):
    """Fields both endpoints share. Sampling parameters are accepted and checked
    like vLLM checks them, then ignored: the simulated model's tokens depend only
    on the seed and the sequence."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    n: int | None = 1
    seed: int | None = Field(None, ge=_INT64_MIN, le=_INT64_MAX)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    return_token_ids: bool | None = False
    min_tokens: int = 0
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    user: str | None = None
    request_id: str | None = None


class ChatRequest(_Generate):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    include_reasoning: bool = True
    add_generation_prompt: bool = True

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Generate):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # vLLM's default for /v1/completions
    logprobs: int | None = None
    echo: bool | None = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("the simulated engine serves one prompt per request")
            return prompt[0]
        return prompt

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


def parse_request(model: type[BaseModel], content_type: str, raw: bytes, max_model_len: int) -> Any:
    """Body bytes to a validated request, or RequestError (400) in vLLM's words."""
    if content_type.lower().split(";", 1)[0].strip() != "application/json":
        raise RequestError(
            "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed", err_type="Bad Request"
        )
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        position = getattr(exc, "pos", 0)
        detail = getattr(exc, "msg", str(exc))
        raise RequestError(
            f"1 validation error:\n  {{'type': 'json_invalid', 'loc': 'body.{position}', 'msg': 'JSON decode error', "
            f"'input': {{}}, 'ctx': {{'error': {detail!r}}}}}",
            err_type="Bad Request", param=f"body.{position}",
        ) from None
    if not isinstance(data, dict):
        raise RequestError(
            "1 validation error:\n  {'type': 'model_attributes_type', 'loc': 'body', "
            "'msg': 'Input should be a valid dictionary or object to extract fields from'}",
            err_type="Bad Request", param="body",
        )
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        label = "error" if len(errors) == 1 else "errors"
        lines = []
        for err in errors[:10]:
            loc = ".".join(["body", *(str(p) for p in err["loc"])])
            lines.append(f"  {{'type': {err['type']!r}, 'loc': {loc!r}, 'msg': {err['msg']!r}}}")
        first = ".".join(["body", *(str(p) for p in errors[0]["loc"])])
        raise RequestError(f"{len(errors)} validation {label}:\n" + "\n".join(lines), err_type="Bad Request", param=first) from None
    _check_sampling(request, max_model_len)
    return request


def _check_sampling(request: _Generate, max_model_len: int) -> None:
    """The checks vLLM makes on sampling parameters, plus what the simulation does not do."""
    invalid = RequestError.invalid
    max_tokens = request.requested_max_tokens
    name = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) is not None else "max_tokens"
    if max_tokens is not None and max_tokens > max_model_len:
        raise invalid(
            f"{name}={max_tokens} cannot be greater than max_model_len={max_model_len}. "
            "Please request fewer output tokens.", name, max_tokens,
        )
    if request.n is not None and request.n < 1:
        raise RequestError(f"n must be at least 1, got {request.n}.")
    if max_tokens is not None and max_tokens < 1:
        raise invalid(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens", max_tokens)
    if request.temperature is not None and request.temperature < 0:
        raise invalid(f"temperature must be non-negative, got {request.temperature}.", "temperature", request.temperature)
    if request.top_p is not None and not 0 < request.top_p <= 1:
        raise invalid(f"top_p must be in (0, 1], got {request.top_p}.", "top_p", request.top_p)
    if request.top_k is not None and request.top_k < -1:
        raise invalid(f"top_k must be 0 (disable), or at least 1, got {request.top_k}.", "top_k", request.top_k)
    if request.min_p is not None and not 0 <= request.min_p <= 1:
        raise invalid(f"min_p must be in [0, 1], got {request.min_p}.", "min_p", request.min_p)
    for penalty in ("presence_penalty", "frequency_penalty"):
        value = getattr(request, penalty)
        if value is not None and not -2 <= value <= 2:
            raise invalid(f"{penalty} must be in [-2, 2], got {value}.", penalty, value)
    if request.repetition_penalty is not None and request.repetition_penalty <= 0:
        raise invalid(
            f"repetition_penalty must be greater than zero, got {request.repetition_penalty}.",
            "repetition_penalty", request.repetition_penalty,
        )
    if request.min_tokens < 0:
        raise invalid(f"min_tokens must be greater than or equal to 0, got {request.min_tokens}.", "min_tokens", request.min_tokens)
    if max_tokens is not None and request.min_tokens > max_tokens:
        raise invalid(
            f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {request.min_tokens}.",
            "min_tokens", request.min_tokens,
        )
    if request.stream_options is not None and not request.stream:
        raise invalid("Stream options can only be defined when `stream=True`.", "stream_options")
    # What vLLM does and this simulation does not:
    if (request.n or 1) != 1:
        raise RequestError("The simulated engine supports only n=1.", param="n")
    if request.logprobs or getattr(request, "top_logprobs", None):
        raise RequestError("The simulated engine does not return logprobs.", param="logprobs")
    if getattr(request, "echo", False):
        raise RequestError("The simulated engine does not support echo.", param="echo")


def usage_flags(request: _Generate) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats), as vLLM's should_include_usage."""
    options = request.stream_options
    if options is None:
        return False, False
    include = bool(options.include_usage)
    return include, include and bool(options.continuous_usage_stats)


# --- reasoning: vLLM's deepseek_r1 parser ---------------------------------------------------


def reasoning_ended_in(prompt_ids: list[int]) -> bool:
    """Whether the prompt already closed its reasoning (last marker is `</think>`)."""
    for tid in reversed(prompt_ids):
        if tid == THINK:
            return False
        if tid == END_THINK:
            return True
    return False


class ReasoningStream:
    """Splits streamed deltas into `reasoning` and `content` like vLLM's
    `--reasoning-parser deepseek_r1` does, delta by delta, quirks included: a
    delta that is only `</think>` produces no message, and once reasoning ends
    everything is content."""

    def __init__(self, prompt_ids: list[int]) -> None:
        self.ended = reasoning_ended_in(prompt_ids)
        self.think_generated = False  # a <think> among the generated tokens

    def delta(self, text: str, ids: list[int]) -> dict | None:
        if self.ended:
            return {"content": text}
        message = self._reasoning_delta(text, ids)
        if THINK in ids:
            self.think_generated = True
        if END_THINK in ids:
            self.ended = True
        return message

    def _reasoning_delta(self, text: str, ids: list[int]) -> dict | None:
        if len(ids) == 1 and ids[0] in (THINK, END_THINK):
            return None
        if THINK in ids and not self.think_generated:
            if END_THINK in ids:
                start, end = text.find("<think>"), text.find("</think>")
                content = text[end + len("</think>"):]
                return {"content": content or None, "reasoning": text[start + len("<think>"):end]}
            return {"reasoning": text}
        # With or without a generated <think> (deepseek_r1 assumes the chat
        # template opened it), the rest of the reasoning phase reads the same.
        if END_THINK in ids:
            reasoning, _, content = text.partition("</think>")
            return {"content": content or None, "reasoning": reasoning}
        return {"reasoning": text}


def split_reasoning(text: str) -> tuple[str | None, str | None]:
    """The non-streaming split (vLLM's extract_reasoning): (reasoning, content)."""
    before, marker, after = text.partition("<think>")
    text = after if marker else before
    if "</think>" not in text:
        return text, None
    reasoning, _, content = text.partition("</think>")
    return reasoning, content or None


# --- responses --------------------------------------------------------------------------


def to_json(value: Any) -> bytes:
    """Compact JSON, non-ASCII kept as UTF-8: what pydantic's model_dump_json writes."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def sse(payload: dict) -> bytes:
    return b"data: " + to_json(payload) + b"\n\n"


class TokenChunks:
    """The plain mid-stream chunks of one stream (most of the traffic), assembled
    from bytes around a head serialised once. Same bytes as `sse()` of the dict."""

    def __init__(self, head: dict) -> None:
        self.prefix = b"data: " + to_json(head)[:-1] + b',"choices":[{"index":0,'

    def chat(self, delta: dict, token_ids: list[int] | None) -> bytes:
        return (
            self.prefix + b'"delta":' + to_json(delta) + b',"logprobs":null,"finish_reason":null,"token_ids":'
            + to_json(token_ids) + b"}]}\n\n"
        )

    def completion(self, text: str, prompt_token_ids: list[int] | None, token_ids: list[int] | None) -> bytes:
        return (
            self.prefix + b'"text":' + to_json(text) + b',"logprobs":null,"finish_reason":null,"stop_reason":null,'
            b'"prompt_token_ids":' + to_json(prompt_token_ids) + b',"token_ids":' + to_json(token_ids) + b"}]}\n\n"
        )


SSE_DONE = b"data: [DONE]\n\n"


def chat_usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int, *, full: bool = False) -> dict:
    usage = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }
    if full:
        usage["prompt_tokens_details"] = None
    usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


def completion_usage(prompt_tokens: int, completion_tokens: int, *, full: bool = False) -> dict:
    usage = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }
    if full:
        usage["prompt_tokens_details"] = None
        usage["completion_tokens_details"] = None
    return usage


def chat_response(
    *, request_id: str, created: int, model: str, fingerprint: str, text: str, output_ids: list[int],
    prompt_ids: list[int], finish_reason: str, reasoning_tokens: int, include_reasoning: bool,
    return_token_ids: bool,
) -> dict:
    reasoning, content = split_reasoning(text)
    message = {
        "role": "assistant", "content": content, "refusal": None, "annotations": None,
        "audio": None, "function_call": None, "reasoning": reasoning if include_reasoning else None,
    }
    choice = {
        "index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason,
        "stop_reason": None,
        "token_ids": output_ids if return_token_ids and include_reasoning else None,
        "routed_experts": None,
    }
    return {
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [choice], "service_tier": None, "system_fingerprint": fingerprint,
        "usage": chat_usage(len(prompt_ids), len(output_ids), reasoning_tokens, full=True),
        "prompt_logprobs": None, "prompt_token_ids": prompt_ids if return_token_ids else None,
        "prompt_text": None, "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
    }


def completion_response(
    *, request_id: str, created: int, model: str, fingerprint: str, text: str, output_ids: list[int],
    prompt_ids: list[int], finish_reason: str, return_token_ids: bool,
) -> dict:
    choice = {
        "index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None,
        "token_ids": output_ids if return_token_ids else None, "prompt_logprobs": None,
        "prompt_token_ids": prompt_ids if return_token_ids else None, "routed_experts": None,
    }
    return {
        "id": request_id, "object": "text_completion", "created": created, "model": model,
        "choices": [choice], "service_tier": None, "system_fingerprint": fingerprint,
        "usage": completion_usage(len(prompt_ids), len(output_ids), full=True),
        "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
    }
