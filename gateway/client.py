"""A Python client for the gateway's public gRPC API, sync and async, over the generated stubs.

    from gateway.client import Client
    with Client("127.0.0.1:8001") as client:
        print(client.generate("The lighthouse keeper", max_tokens=32).text)
        for delta in client.stream([1, 2, 3], max_tokens=8):
            print(delta.text, end="", flush=True)

``AsyncClient`` has the same methods as coroutines / async iterators. ``tls`` (a
``protos.tls.TLSConfig``) and ``api_key`` match a gateway started with ``--tls-*`` / an API key. Prompts are text (tokenized by
the gateway, no chat template) or token ids; sampling keywords are those of ``SamplingParams``.
Failures raise ``grpc.RpcError`` with the gateway's status (INVALID_ARGUMENT names the field).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc

from engine.sampling_params import SamplingParams
from protos import gateway_pb2, gateway_pb2_grpc
from protos.convert import sampling_to_proto
from protos.tls import TLSConfig, aio_channel


@dataclass
class Completion:
    """A whole response: the concatenated text and tokens, why it ended, token counts."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, msg: gateway_pb2.GatewayGenerateResponse) -> None:
        self.text += msg.text
        self.token_ids += msg.token_ids
        if msg.finish_reason:
            self.finish_reason = msg.finish_reason
            u = msg.usage
            self.prompt_tokens, self.completion_tokens, self.cached_tokens = (
                u.prompt_tokens, u.completion_tokens, u.cached_tokens,
            )  # fmt: skip


def build_request(
    prompt: str | Sequence[int], model: str = "", timeout_s: float = 0.0, **sampling: Any
) -> gateway_pb2.GatewayGenerateRequest:
    params = sampling_to_proto(SamplingParams(**sampling))  # validates here, with the field named
    request = gateway_pb2.GatewayGenerateRequest(model=model, sampling=params, timeout_s=timeout_s)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class Client:
    def __init__(
        self, address: str, timeout_s: float = 600.0, tls: TLSConfig | None = None, api_key: str | None = None
    ) -> None:
        if tls is None:
            self.channel = grpc.insecure_channel(address)
        else:
            self.channel = grpc.secure_channel(address, tls.channel_credentials())
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        self.timeout_s, self.metadata = timeout_s, _metadata(api_key)

    def stream(
        self, prompt: str | Sequence[int], model: str = "", **sampling: Any
    ) -> Iterator[gateway_pb2.GatewayGenerateResponse]:
        request = build_request(prompt, model, **sampling)
        yield from self.stub.Generate(request, timeout=self.timeout_s, metadata=self.metadata)

    def generate(self, prompt: str | Sequence[int], model: str = "", **sampling: Any) -> Completion:
        out = Completion()
        for msg in self.stream(prompt, model, **sampling):
            out.add(msg)
        return out

    def models(self) -> list[str]:
        reply = self.stub.ListModels(
            gateway_pb2.ModelsRequest(), timeout=self.timeout_s, metadata=self.metadata
        )
        return [m.id for m in reply.models]

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient:
    def __init__(
        self, address: str, timeout_s: float = 600.0, tls: TLSConfig | None = None, api_key: str | None = None
    ) -> None:
        self.channel = aio_channel(address, tls)
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        self.timeout_s, self.metadata = timeout_s, _metadata(api_key)

    async def stream(
        self, prompt: str | Sequence[int], model: str = "", **sampling: Any
    ) -> AsyncIterator[gateway_pb2.GatewayGenerateResponse]:
        request = build_request(prompt, model, **sampling)
        async for msg in self.stub.Generate(request, timeout=self.timeout_s, metadata=self.metadata):
            yield msg

    async def generate(self, prompt: str | Sequence[int], model: str = "", **sampling: Any) -> Completion:
        out = Completion()
        async for msg in self.stream(prompt, model, **sampling):
            out.add(msg)
        return out

    async def models(self) -> list[str]:
        request = gateway_pb2.ModelsRequest()
        reply = await self.stub.ListModels(request, timeout=self.timeout_s, metadata=self.metadata)
        return [m.id for m in reply.models]

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
