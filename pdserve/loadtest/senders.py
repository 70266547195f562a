"""The load generator's two runners, which alone talk to the gateway: OpenAI REST over httpx
(streaming SSE) and the public gRPC API over grpc.aio. Each opens its client once per run and yields
``send(spec, trace)``, which streams one request and records what it sees in ``trace``."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import httpx

from pdserve.loadtest.metrics import StreamTrace
from pdserve.loadtest.workload import RequestSpec

if TYPE_CHECKING:
    from pdserve.loadtest.load_test import LoadTestConfig

Send = Callable[[RequestSpec, StreamTrace], Awaitable[None]]


class RequestError(Exception):
    """The gateway refused or broke one request; the message is what the report shows."""


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")


def on_rest_chunk(chunk: dict[str, Any], now: float, trace: StreamTrace) -> None:
    """Fold one SSE chunk into the trace; the final usage chunk overrides the chunk count."""
    if "error" in chunk:
        raise RequestError(f"stream error: {chunk['error'].get('message', chunk['error'])}")
    choices = chunk.get("choices") or []
    if choices and choices[0].get("text"):
        trace.token_times_s.append(now)
        trace.num_output_tokens += 1
    if usage := chunk.get("usage"):
        trace.num_prompt_tokens = usage["prompt_tokens"]
        trace.num_output_tokens = usage["completion_tokens"]


@contextlib.asynccontextmanager
async def rest_sender(cfg: LoadTestConfig) -> AsyncIterator[tuple[Send, str]]:

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would bury the report

    limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
    async with httpx.AsyncClient(
        base_url=cfg.base_url,
        timeout=cfg.request_timeout_s,
        limits=limits,
        trust_env=False,
        headers=auth_headers(),
    ) as client:
        model = cfg.model
        if model is None:
            try:
                resp = await client.get("/v1/models")
                resp.raise_for_status()
                model = str(resp.json()["data"][0]["id"])
            except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
                raise RuntimeError(
                    f"cannot list models at {cfg.base_url}/v1/models ({exc}); pass --model"
                ) from exc

        async def send(spec: RequestSpec, trace: StreamTrace) -> None:
            payload = {
                "model": model,
                "prompt": spec.prompt,
                "max_tokens": spec.max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "ignore_eos": True,
            }
            async with client.stream("POST", "/v1/completions", json=payload) as resp:
                if resp.status_code >= 400:
                    raise RequestError(f"HTTP {resp.status_code}: {_error_message(await resp.aread())}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line.removeprefix("data:").strip()
                    if data == "[DONE]":
                        return
                    on_rest_chunk(json.loads(data), time.perf_counter(), trace)
            raise RequestError("stream ended without data: [DONE]")

        yield send, model


@contextlib.asynccontextmanager
async def grpc_sender(cfg: LoadTestConfig) -> AsyncIterator[tuple[Send, str]]:
    import grpc

    from protos import common_pb2, gateway_pb2, gateway_pb2_grpc

    model = cfg.model or ""
    async with grpc.aio.insecure_channel(cfg.grpc_address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)

        async def send(spec: RequestSpec, trace: StreamTrace) -> None:
            sampling = common_pb2.SamplingParams(temperature=0, max_tokens=spec.max_tokens, ignore_eos=True)
            request = gateway_pb2.GatewayGenerateRequest(
                model=model, sampling=sampling, timeout_s=cfg.request_timeout_s
            )
            if isinstance(spec.prompt, str):
                request.text = spec.prompt
            else:
                request.token_ids.ids.extend(spec.prompt)
            try:
                async for resp in stub.Generate(request, timeout=cfg.request_timeout_s):
                    if resp.token_ids:
                        trace.token_times_s.append(time.perf_counter())
                        trace.num_output_tokens += len(resp.token_ids)
                    if resp.HasField("usage"):
                        trace.num_prompt_tokens = resp.usage.prompt_tokens
                    if resp.finish_reason:
                        return
            except grpc.aio.AioRpcError as exc:
                raise RequestError(f"{exc.code().name}: {exc.details()}") from exc
            raise RequestError("stream ended without a finish_reason")

        yield send, model


def auth_headers() -> dict[str, str]:
    """The gateway's API key, if this environment has one ($PDSERVE_API_KEY)."""
    from engine.env import Env

    key = Env.read().api_key
    return {"Authorization": f"Bearer {key}"} if key else {}
