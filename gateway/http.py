"""The REST API (FastAPI): /v1/completions, /v1/chat/completions (SSE when ``stream``), /v1/models,
/health, /metrics; /v1/models/{id}, /tokenize, /detokenize and /version (``gateway.utility_api``).

Every error is an OpenAI-style JSON body with the right status: 400 for what the client sent
(malformed JSON, wrong types, out-of-range values — naming the parameter), 429 when every instance
is full, 503 when none is healthy, 504 past the deadline. A streamed request whose first token
cannot be produced gets the same status and body; once tokens flowed, an error is a final
``data: {"error": ...}`` event before ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.envelope import request_id
from gateway.errors import APIError, check_api_key
from gateway.generation import Chunk, Usage
from gateway.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    envelope,
    template_kwargs,
)
from gateway.sse import DONE, SSEFrames
from gateway.state import GatewayState
from gateway.utility_api import add_utility_routes

log = logging.getLogger("pdserve.gateway")
_STATUSES = {s.value for s in HTTPStatus}
_DISCONNECT_POLL_S = 0.25
T = TypeVar("T")


def create_app(state: GatewayState) -> FastAPI:
    app = FastAPI(title="pdserve", version="0.1.0", description="OpenAI-compatible API of pdserve")
    gen = state.generator

    # Starlette runs the last added outermost: the key is checked before a body is read.
    app.add_middleware(
        BodyLimit, max_bytes=state.cfg.max_request_bytes, timeout_s=state.cfg.http.body_timeout_s
    )
    if state.cfg.api_key is not None:
        app.add_middleware(APIKeyAuth, api_key=state.cfg.api_key)

    def count(request: Request, status: int) -> None:
        """Requests rejected before generation started still show in pdserve_requests_total."""
        api = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}.get(request.url.path)
        if api is not None:
            state.metrics.requests.labels(api, str(status)).inc()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        if not e.counted:
            count(request, e.status)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        # a union's member tags ("function-after[...]") are pydantic's, not the client's field names
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and "[" not in str(p)]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            error = APIError(400, "the request body is not valid JSON")
        elif first.get("type") == "extra_forbidden" and param is not None:
            error = APIError.unsupported(param)  # a field this server does not know
        else:
            error = APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid')}", param)
        count(request, 400)
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _framework(request: Request, e: StarletteHTTPException) -> Response:
        """The framework's own errors (unknown path, wrong method, a body it cannot parse)."""
        if e.status_code == 400:  # the 400 FastAPI raises itself: a body it could not decode
            message = "the request body cannot be parsed as JSON"
        else:
            message = HTTPStatus(e.status_code).phrase if e.status_code in _STATUSES else "request refused"
        count(request, e.status_code)
        body = APIError(e.status_code, f"{message}: {request.method} {request.url.path}"[:200]).body()
        return JSONResponse(body, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        rid = request_id.get()
        log.exception("request %s: unhandled error serving %s", rid, request.url.path)
        body = APIError(500, f"internal error (request id {rid})").body()
        return JSONResponse(body, status_code=500)

    def check_model(name: str) -> None:
        if name not in (state.model_name, gen.model_name):
            raise APIError.model_not_found(name, state.model_name)

    add_utility_routes(app, state)

    @app.get("/health")
    async def health() -> JSONResponse:
        body = state.health()
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        await asyncio.gather(state.prefill.refresh_loads(), state.decode.refresh_loads())
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [state.model_card()]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body.model)
        body.check_supported()
        prompt_ids = await gen.tokenize_async(body.single_prompt())
        params = body.sampling(body.max_tokens or 16, body.logprobs, gen.vocab_size)
        gen.check_max_tokens(prompt_ids, params)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        chunks = gen.generate(prompt_ids, params, "completions", request_id)
        offset = 0

        def choice(c: Chunk) -> dict[str, Any]:
            nonlocal offset
            lps = (
                completion_logprobs(gen.tokenizer, c.logprobs, offset) if body.logprobs is not None else None
            )
            offset += len(c.text)
            return {"index": 0, "text": c.text, "logprobs": lps, "finish_reason": c.finish_reason}

        if body.stream:
            frames = SSEFrames("text_completion", request_id, body.model)
            return await _sse(request, chunks, lambda c: frames.event(choice(c)), frames, body.include_usage)
        parts = await _collect(chunks, request)
        merged = {
            "index": 0,
            "text": "".join(c.text for c in parts),
            "finish_reason": parts[-1].finish_reason,
            "logprobs": None,
        }
        if body.logprobs is not None:
            merged["logprobs"] = completion_logprobs(
                gen.tokenizer, [lp for c in parts for lp in c.logprobs], 0
            )
        return envelope("text_completion", request_id, body.model, [merged], parts[-1].usage)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        check_model(body.model)
        body.check_supported()
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        gen.check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError.invalid("top_logprobs", "needs logprobs: true")
        kwargs = template_kwargs(body.chat_template_kwargs)
        try:
            text = await asyncio.to_thread(gen.tokenizer.apply_chat_template, messages, **kwargs)
        except Exception as e:  # a template's raise_exception: the conversation does not fit it
            raise APIError.invalid("messages", str(e)) from None
        prompt_ids = await gen.tokenize_async(text, "messages", add_special_tokens=False)
        top = body.top_logprobs or 0
        max_tokens = body.max_completion_tokens or body.max_tokens or gen.room(prompt_ids)
        params = body.sampling(max_tokens, top if body.logprobs else None, gen.vocab_size)
        gen.check_max_tokens(prompt_ids, params)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        chunks = gen.generate(prompt_ids, params, "chat", request_id)
        first = True

        def delta(c: Chunk) -> dict[str, Any]:
            nonlocal first
            d: dict[str, Any] = {"content": c.text}
            if first:
                d["role"], first = "assistant", False
            lps = chat_logprobs(gen.tokenizer, c.logprobs) if body.logprobs else None
            return {"index": 0, "delta": d, "logprobs": lps, "finish_reason": c.finish_reason}

        if body.stream:
            frames = SSEFrames("chat.completion.chunk", request_id, body.model)
            return await _sse(request, chunks, lambda c: frames.event(delta(c)), frames, body.include_usage)
        parts = await _collect(chunks, request)
        lps = (
            chat_logprobs(gen.tokenizer, [lp for c in parts for lp in c.logprobs]) if body.logprobs else None
        )
        message = {"role": "assistant", "content": "".join(c.text for c in parts)}
        choice = {"index": 0, "message": message, "logprobs": lps, "finish_reason": parts[-1].finish_reason}
        return envelope("chat.completion", request_id, body.model, [choice], parts[-1].usage)

    return app


async def _sse(
    request: Request,
    chunks: AsyncIterator[Chunk],
    event: Callable[[Chunk], bytes],
    frames: SSEFrames,
    include_usage: bool,
) -> Response:
    """Server-sent events; the first chunk is awaited here so that an error before any token gets
    a real HTTP status instead of a 200 with an error event."""
    try:
        first = await _unless_disconnected(anext(aiter(chunks)), request)
    except APIError as e:
        await chunks.aclose()  # type: ignore[attr-defined]
        return JSONResponse(e.body(), status_code=e.status)

    async def events() -> AsyncIterator[bytes]:
        usage: Usage | None = None
        try:
            async for c in _chain(first, chunks):
                usage = c.usage or usage
                yield event(c)
            if include_usage and usage is not None:
                yield frames.usage(usage)
        except APIError as e:
            yield frames.error(e.body())
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]  # client gone: cancels the decode call
        yield DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class APIKeyAuth:
    """ASGI middleware: every path but /health and /metrics (open for probes and scrapers) needs
    ``Authorization: Bearer <key>`` (401 otherwise) — the API, and its /docs and /openapi.json.
    Plain ASGI on purpose: Starlette's BaseHTTPMiddleware would hide a client's disconnect from
    streaming responses."""

    OPEN = ("/health", "/metrics")

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN:
            headers = dict(scope.get("headers") or ())
            try:
                check_api_key(headers.get(b"authorization", b"").decode("latin-1"), self.api_key)
            except APIError as e:
                response = JSONResponse(
                    e.body(), status_code=e.status, headers={"WWW-Authenticate": "Bearer"}
                )
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: the body is read here, whole, before the app runs: over ``max_bytes`` (by its
    Content-Length, or by what arrived of a chunked body) it gets 413 before any of it is parsed;
    not complete within ``timeout_s`` (a client sending it slowly holds a connection and memory)
    it gets 408."""

    def __init__(self, app: Any, max_bytes: int, timeout_s: float = 60.0) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._reject(
                send, 413, f"request body over this server's limit of {self.max_bytes} bytes"
            )
        chunks, size, more = [], 0, True
        try:
            async with asyncio.timeout(self.timeout_s):
                while more:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # the client left while sending
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.max_bytes:
                        return await self._reject(
                            send, 413, f"request body over this server's limit of {self.max_bytes} bytes"
                        )
                    more = message.get("more_body", False)
        except TimeoutError:
            return await self._reject(send, 408, f"request body not received within {self.timeout_s:g} s")
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Callable, status: int, message: str) -> None:
        body = json.dumps(APIError(status, message).body()).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _collect(chunks: AsyncIterator[Chunk], request: Request) -> list[Chunk]:
    """All chunks of a non-streamed request (cancelled if the client leaves first)."""

    async def gather() -> list[Chunk]:
        return [c async for c in chunks]

    try:
        return await _unless_disconnected(gather(), request)
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


async def _unless_disconnected(work: Awaitable[T], request: Request) -> T:
    """Await ``work``, cancelling it if the client disconnects first. Starlette does not cancel a
    handler whose client went away, and the work holds KV pages on the instances until it ends."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(499, "the client closed the connection", type="cancelled")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _chain(first: Chunk, rest: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    yield first
    async for c in rest:
        yield c
