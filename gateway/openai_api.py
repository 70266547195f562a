"""The OpenAI-compatible request schemas (pydantic) and response bodies.

Requests are checked twice: pydantic for types and ranges (a failure names the field and becomes
HTTP 400), then ``to_params`` for what needs the engine's rules. Fields OpenAI defines that we do
not implement are accepted only at their no-op value, so a client never silently gets something
other than it asked for. vLLM-style extensions: ``top_k``, ``ignore_eos``, ``stop_token_ids``,
``skip_special_tokens``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from engine.output import TokenLogprob
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from gateway.errors import APIError
from gateway.generation import Usage
from gateway.limits import unicode_problem

_INT32_MAX, _UINT32_MAX = 2**31 - 1, 2**32 - 1


def _encodable(v: str) -> str:
    if (problem := unicode_problem(v)) is not None:
        raise ValueError(problem)
    return v


# Every client string that may reach the tokenizer, a stop-string search or a log line: it must be
# text UTF-8 can carry (a lone surrogate fails deep inside the tokenizer or protobuf otherwise).
Text = Annotated[str, AfterValidator(_encodable)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0, description="not supported; must be 0")
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0, description="not supported; must be 0")
    logit_bias: dict[str, float] | None = Field(default=None, max_length=0)
    user: Text | None = None
    top_k: int = Field(default=-1, ge=-1, le=_INT32_MAX)  # the internal protos carry int32
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0, le=_UINT32_MAX)]] = Field(
        default_factory=list, max_length=64
    )
    skip_special_tokens: bool = True

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 non-empty stop strings")
        return stops

    def sampling(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        try:
            return SamplingParams(
                temperature=self.temperature,
                top_k=self.top_k if self.top_k != 0 else -1,
                top_p=self.top_p,
                seed=self.seed,
                max_tokens=max_tokens,
                stop=tuple(self.stop or ()),
                stop_token_ids=tuple(self.stop_token_ids),
                ignore_eos=self.ignore_eos,
                logprobs=logprobs,
                skip_special_tokens=self.skip_special_tokens,
            )
        except ValueError as e:
            field = str(e).split(":", 1)[0]
            raise APIError.invalid(field, str(e).split(":", 1)[-1].strip()) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = Field(default=False, description="not supported")
    suffix: str | None = Field(default=None, max_length=0)
    best_of: int | None = Field(default=None, ge=1, le=1)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            if len(p) != 1:
                raise APIError.invalid("prompt", "one prompt per request (batches are not supported)")
            p = p[0]
        return p  # type: ignore[return-value]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _parts(cls, v: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        for part in v if isinstance(v, list) else ():
            for value in part.values():
                if isinstance(value, str) and (problem := unicode_problem(value)) is not None:
                    raise ValueError(problem)
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError.invalid("messages", "only text content parts are supported")
                parts.append(part["text"])
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Any] | None = Field(default=None, max_length=0, description="not supported")
    response_format: dict[str, Any] | None = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v.get("type", "text") != "text":
            raise ValueError("only {'type': 'text'} is supported")
        return v


# -- responses ---------------------------------------------------------------------------------


def usage_body(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tokenizer: Tokenizer, lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
    tokens = [token_text(tokenizer, lp.token_id) for lp in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{token_text(tokenizer, t): p for t, p in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer: Tokenizer, lps: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, p) for t, p in lp.top]} for lp in lps
        ]
    }


def envelope(
    kind: str, request_id: str, model: str, choices: list[dict[str, Any]], usage: Usage | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": request_id,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage_body(usage)
    return body
