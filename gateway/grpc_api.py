"""The public gRPC API (``GatewayService``): the REST pipeline behind a streaming RPC.

The server's ``protos.guard.RequestGuard`` runs first: it checks the API key (``authorize``) and
only then parses the message, so an unauthenticated or malformed call costs no more than that.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from gateway.envelope import new_request_id, request_id
from gateway.errors import APIError, check_api_key
from gateway.state import GatewayState
from protos import decode_pb2, gateway_pb2, gateway_pb2_grpc
from protos.convert import logprob_to_proto, sampling_from_proto
from protos.errors import Unauthenticated
from protos.guard import Authorize

MAX_TIMEOUT_S = 24 * 3600.0


def authorize(api_key: str) -> Authorize:
    """The guard's check: ``authorization: Bearer <key>`` metadata, or UNAUTHENTICATED."""

    def check(method: str, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        value = dict(metadata).get("authorization", "")
        try:
            check_api_key(value if isinstance(value, str) else value.decode("latin-1"), api_key)
        except APIError as e:
            raise Unauthenticated(e.message) from None

    return check


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, state: GatewayState) -> None:
        self.state = state

    async def ListModels(self, request: Any, context: Any) -> gateway_pb2.ModelsResponse:
        card = self.state.model_card()
        return gateway_pb2.ModelsResponse(
            models=[
                gateway_pb2.ModelInfo(
                    id=card["id"], max_model_len=card["max_model_len"], vocab_size=card["vocab_size"]
                )
            ]
        )

    async def Generate(
        self, request: gateway_pb2.GatewayGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GatewayGenerateResponse]:
        gen = self.state.generator
        request_id.set(new_request_id())  # this call's task: its log lines carry the id
        try:
            if request.model and request.model not in (self.state.model_name, gen.model_name):
                raise APIError.model_not_found(request.model, self.state.model_name)
            kind = request.WhichOneof("prompt")
            if kind is None:
                raise APIError.invalid("prompt", "set text or token_ids")
            prompt_ids = await gen.tokenize_async(
                request.text if kind == "text" else list(request.token_ids.ids)
            )
            try:
                params = sampling_from_proto(request.sampling)
            except ValueError as e:
                raise APIError.invalid(
                    f"sampling.{str(e).split(':', 1)[0]}", str(e).split(":", 1)[-1].strip()
                ) from None
            if params.logit_bias and params.logit_bias[-1][0] >= gen.vocab_size:  # sorted by id
                raise APIError.invalid("sampling.logit_bias", f"token ids must be in [0, {gen.vocab_size})")
            if not 0 <= request.timeout_s <= MAX_TIMEOUT_S:  # also false for NaN
                raise APIError.invalid(
                    "timeout_s", f"must be in [0, {MAX_TIMEOUT_S:.0f}] seconds (0 = the default)"
                )
            stream = gen.generate(
                prompt_ids, params, "grpc", request.request_id or None, request.timeout_s or None
            )
            async for c in stream:
                yield gateway_pb2.GatewayGenerateResponse(
                    request_id=request.request_id,
                    token_ids=c.token_ids,
                    text=c.text,
                    logprobs=[logprob_to_proto(lp) for lp in c.logprobs],
                    finish_reason=c.finish_reason or "",
                    usage=decode_pb2.Usage(
                        prompt_tokens=c.usage.prompt_tokens,
                        completion_tokens=c.usage.completion_tokens,
                        cached_tokens=c.usage.cached_tokens,
                    ) if c.usage else None,
                    timing=c.timing,
                )  # fmt: skip
        except APIError as e:
            await context.abort(e.grpc_code, e.message)
