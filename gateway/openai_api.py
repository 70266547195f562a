"""The OpenAI-compatible request schemas (pydantic) and response bodies.

Requests are checked three times: pydantic for types and ranges (a failure names the field and
becomes HTTP 400), ``check_supported`` for fields OpenAI defines that we do not implement (accepted
only at their no-op value: ``n`` 1, ``echo`` false, no ``tools``, ...; any other value is a 400
naming the field and saying it is not supported), then ``sampling`` for the engine's own rules. A
field no one defines is a 400 as well (``extra="forbid"``), so a client never silently gets
something other than it asked for. vLLM-style extensions: ``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ``skip_special_tokens``,
and ``chat_template_kwargs`` on chat.
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
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


def _token_id(v: str) -> str:
    if not v.isascii() or not v.isdigit() or int(v) > _UINT32_MAX:
        raise ValueError(f"keys are token ids (decimal strings), got {v[:20]!r}")
    return v


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=128, description="values above 1 are not supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: (
        dict[Annotated[str, AfterValidator(_token_id)], Annotated[float, Field(ge=-100, le=100)]] | None
    ) = Field(default=None, max_length=1024, description="token id (a decimal string) -> bias in [-100, 100]")
    user: Text | None = None
    top_k: int = Field(default=-1, ge=-1, le=_INT32_MAX)  # the internal protos carry int32
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=100.0, description="HF semantics; 1 = off")
    min_tokens: int = Field(default=0, ge=0, le=_UINT32_MAX)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0, le=_UINT32_MAX)]] = Field(
        default_factory=list, max_length=64
    )
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = Field(default=None, description="not supported")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 non-empty stop strings")
        return stops

    def sampling(self, max_tokens: int, logprobs: int | None, vocab_size: int) -> SamplingParams:
        """The engine's params; ``vocab_size`` bounds the token ids of ``logit_bias``."""
        if self.min_tokens > max_tokens:
            raise APIError.invalid(
                "min_tokens", f"must be <= max_tokens ({max_tokens}), got {self.min_tokens}"
            )
        if any(int(t) >= vocab_size for t in self.logit_bias or {}):
            raise APIError.invalid("logit_bias", f"token ids must be in [0, {vocab_size})")
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
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty,
                min_p=self.min_p,
                min_tokens=self.min_tokens,
                logit_bias=tuple((int(t), b) for t, b in (self.logit_bias or {}).items()),
            )
        except ValueError as e:
            field = str(e).split(":", 1)[0]
            raise APIError.invalid(field, str(e).split(":", 1)[-1].strip()) from None

    def check_supported(self) -> None:
        """400 naming the first field set to something this server does not implement."""
        for field, value, no_op in self._unsupported():
            if value is not None and value not in no_op:
                raise APIError.unsupported(field, value if no_op else None)

    def _unsupported(self) -> list[tuple[str, Any, tuple[Any, ...]]]:
        """(field, value, the values that change nothing): later work implements these."""
        return [("n", self.n, (1,)), ("prompt_logprobs", self.prompt_logprobs, ())]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = Field(default=False, description="true is not supported")
    suffix: str | None = Field(default=None, description="not supported")
    best_of: int | None = Field(default=None, ge=1, le=128, description="values above 1 are not supported")

    def _unsupported(self) -> list[tuple[str, Any, tuple[Any, ...]]]:
        return [*super()._unsupported(), ("echo", self.echo, (False,)), ("suffix", self.suffix, ("",)),
                ("best_of", self.best_of, (1,))]  # fmt: skip

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


_TEMPLATE_OWN = frozenset({"messages", "add_generation_prompt", "tokenize", "tools", "documents"})


def template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``chat_template_kwargs`` as the template's variables (``enable_thinking``, ...); not the
    ones the server sets itself, nor ``tools`` (not supported)."""
    clash = sorted(_TEMPLATE_OWN & set(kwargs or {}))
    if clash:
        raise APIError.invalid("chat_template_kwargs", f"{clash[0]!r} cannot be set here")
    return dict(kwargs or {})


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    chat_template_kwargs: dict[Text, Any] | None = Field(default=None, max_length=32)
    # Accepted at their no-op values only (``check_supported``).
    tools: list[Any] | None = Field(default=None, description="not supported")
    tool_choice: str | dict[str, Any] | None = Field(default=None, description="only 'none' is supported")
    functions: list[Any] | None = Field(default=None, description="not supported")
    function_call: str | dict[str, Any] | None = Field(default=None, description="only 'none' is supported")
    parallel_tool_calls: bool | None = None  # about tools, of which there are none
    response_format: dict[str, Any] | None = Field(default=None, description="only {'type': 'text'}")
    modalities: list[str] | None = Field(default=None, description="only ['text']")
    audio: dict[str, Any] | None = Field(default=None, description="not supported")
    prediction: dict[str, Any] | None = Field(default=None, description="not supported")
    reasoning_effort: str | None = Field(default=None, description="not supported")
    store: bool | None = Field(default=None, description="true is not supported")
    metadata: dict[str, Text] | None = None  # labels for stored completions; nothing is stored
    service_tier: str | None = Field(default=None, description="only 'auto' or 'default'")

    def _unsupported(self) -> list[tuple[str, Any, tuple[Any, ...]]]:
        text = {"type": "text"}
        return [*super()._unsupported(), ("tools", self.tools or None, ()),
                ("tool_choice", self.tool_choice, ("none",)), ("functions", self.functions or None, ()),
                ("function_call", self.function_call, ("none",)),
                ("response_format", self.response_format, (text,)),
                ("modalities", self.modalities, (["text"],)), ("audio", self.audio, ()),
                ("prediction", self.prediction, ()), ("reasoning_effort", self.reasoning_effort, ()),
                ("store", self.store, (False,)), ("service_tier", self.service_tier, ("auto", "default"))]  # fmt: skip


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
