"""Request bodies the gateway accepts, validated with pydantic.

Fields OpenAI defines are typed and range-checked; anything else (vLLM's extra
sampling parameters such as `top_k`, `min_p`, `repetition_penalty`,
`ignore_eos`) passes through to the engine untouched.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import APIError


class _Body(BaseModel):
    # strict: "0.5" is not a temperature and "yes" is not a bool, as with OpenAI.
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: "StreamOptions | None" = None
    stop: Union[str, list[str], None] = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = None
    user: str | None = None
    # vLLM extras we look at ourselves; the rest pass through untyped.
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    ignore_eos: bool | None = None
    return_token_ids: bool | None = None
    # idlegrid: scheduling priority class (lower runs first).
    priority: int | None = Field(default=None, ge=0, le=9)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[dict[str, Any]], None] = None


class ChatCompletionRequest(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
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


class CompletionRequest(_Body):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool | None = None

    @property
    def output_limit(self) -> int | None:
        return self.max_tokens

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        return " ".join(map(str, self.prompt))


def parse_body(model: type[_Body], body: Any) -> _Body:
    """Validate a decoded JSON body; a 400 naming the first bad field otherwise."""
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        if first["type"] == "missing":
            message = f"'{param}' is a required property"
        else:
            message = f"invalid value for '{param}': {first['msg']}"
        raise APIError(400, message, param=param, code="invalid_value") from None
