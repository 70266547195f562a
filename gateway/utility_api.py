"""The REST routes around generation, spelled as vLLM serves them: ``GET /v1/models/{id}`` (the
``openai`` SDK's ``models.retrieve``), ``POST /tokenize`` (a prompt, or chat messages through the
chat template), ``POST /detokenize`` and ``GET /version``."""

from __future__ import annotations

import asyncio
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from gateway.errors import APIError
from gateway.openai_api import ChatMessage, Text, template_kwargs
from gateway.state import GatewayState

_UINT32_MAX = 2**32 - 1


class TokenizeRequest(BaseModel):
    """A text ``prompt``, or chat ``messages`` rendered by the model's chat template first."""

    model_config = ConfigDict(extra="forbid")

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = Field(default=False, description="true is not supported")
    chat_template_kwargs: dict[Text, Any] | None = Field(default=None, max_length=32)
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Text | None = None
    tokens: list[Annotated[int, Field(ge=0, le=_UINT32_MAX)]] = Field(max_length=1 << 20)


def server_version() -> str:
    try:
        return version("pdserve")
    except PackageNotFoundError:
        return "0+unknown"


def add_utility_routes(app: FastAPI, state: GatewayState) -> None:
    gen = state.generator

    def check_model(name: str | None) -> None:
        if name is not None and name not in (state.model_name, gen.model_name):
            raise APIError.model_not_found(name, state.model_name)

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return state.model_card()

    @app.get("/version")
    async def version_info() -> dict[str, str]:
        return {"version": server_version()}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError.invalid("prompt", "set exactly one of prompt and messages")
        if body.continue_final_message:
            raise APIError.unsupported("continue_final_message", True)
        if body.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            gen.check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
            kwargs = template_kwargs(body.chat_template_kwargs)
            try:
                text = await asyncio.to_thread(
                    gen.tokenizer.apply_chat_template, messages, body.add_generation_prompt, **kwargs
                )
            except Exception as e:  # a template's raise_exception: the conversation does not fit it
                raise APIError.invalid("messages", str(e)) from None
            assert isinstance(text, str), "rendered, not tokenized"
            ids = await gen.tokenize_async(text, "messages", add_special_tokens=bool(body.add_special_tokens))
        else:
            assert body.prompt is not None, "checked above"
            special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = await gen.tokenize_async(body.prompt, add_special_tokens=special)
        strs = (
            [gen.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
            if body.return_token_strs
            else None
        )
        return {"count": len(ids), "max_model_len": gen.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        check_model(body.model)
        vocab = gen.vocab_size
        if any(t >= vocab for t in body.tokens):
            raise APIError.invalid("tokens", f"token ids must be in [0, {vocab})")
        text = await asyncio.to_thread(gen.tokenizer.decode, body.tokens, skip_special_tokens=False)
        return {"prompt": text}
