"""Request bodies the gateway accepts, validated with msgspec.

Fields OpenAI defines are typed and range-checked; anything else (vLLM's extra
sampling parameters such as `top_k`, `min_p`, `repetition_penalty`,
`ignore_eos`) passes through to the engine untouched: the gateway forwards the
body as the client sent it, and these types only say what it may contain.

Types are strict, as with OpenAI: "0.5" is not a temperature and "yes" is not a
bool. msgspec rather than pydantic because validation is on every request's way
to its first token: a chat body validates in about a fifth of pydantic's time.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

import msgspec

from gateway.errors import APIError

Count = Annotated[int, msgspec.Meta(ge=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=20)]


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class Message(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[dict[str, Any]], None] = None


class _Body(msgspec.Struct, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    max_tokens: Count | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=128)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: int | None = None
    user: str | None = None
    # vLLM extras we look at ourselves; the rest pass through untyped.
    top_k: Annotated[int, msgspec.Meta(ge=-1)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    ignore_eos: bool | None = None
    return_token_ids: bool | None = None
    # idlegrid: scheduling priority class (lower runs first).
    priority: Annotated[int, msgspec.Meta(ge=0, le=9)] | None = None


class ChatCompletionRequest(_Body, kw_only=True):
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    max_completion_tokens: Count | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    response_format: dict[str, Any] | None = None

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def prompt_text(self) -> str:
        parts: list[str] = []
        for m in self.messages:
            if isinstance(m.content, str):
                parts.append(m.content)
            elif isinstance(m.content, list):
                parts.extend(str(p.get("text", "")) for p in m.content)
        return "\n".join(parts)


class CompletionRequest(_Body, kw_only=True):
    # A string, token ids, or a batch of either. (A list mixing them gets past here,
    # as msgspec takes one list type per union, and the engine refuses it: a 400 too.)
    prompt: Union[str, list[Union[int, str, list[int]]]]
    logprobs: TopLogprobs | None = None
    echo: bool | None = None

    @property
    def output_limit(self) -> int | None:
        return self.max_tokens

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        return " ".join(map(str, self.prompt))


RequestBody = Union[ChatCompletionRequest, CompletionRequest]

_AT = re.compile(r" - at `\$(.*)`$")
_MISSING = re.compile(r"^Object missing required field `([^`]*)`")


def parse_body(model: type[RequestBody], body: Any) -> RequestBody:
    """Validate a decoded JSON body; a 400 naming the first bad field otherwise."""
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return msgspec.convert(body, model)
    except msgspec.ValidationError as exc:
        raise _invalid(str(exc)) from None


def _invalid(error: str) -> APIError:
    """msgspec's message ("Expected `int` >= 1 - at `$.messages[0].n`") as the
    OpenAI error that names the field ("messages.0.n")."""
    at = _AT.search(error)
    path = re.sub(r"\[(\d+)\]", r".\1", at.group(1)).lstrip(".") if at else ""
    detail = error[: at.start()] if at else error
    missing = _MISSING.match(detail)
    if missing:
        param = ".".join(p for p in (path, missing.group(1)) if p)
        return APIError(400, f"'{param}' is a required property", param=param, code="invalid_value")
    param = path or None
    return APIError(400, f"invalid value for '{param}': {detail}" if param else detail, param=param, code="invalid_value")
