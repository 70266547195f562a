"""The decode service's RPCs. One ``Generate``: validate → reserve the prompt's KV pages → have the
named prefill instance fill them → hand the request to the engine's continuous batch → stream. A
request naming no prefill instance is *colocated*: this engine runs its prompt too, as a
non-disaggregated server would (the gateway's mode when it has no prefill instances). The request's
state lives in ``job.DecodeJob``; errors are ``protos.errors`` types, turned into statuses in one
place (``statuses``).
"""

from __future__ import annotations

import dataclasses
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from decode_svc.job import Admissions, DecodeJob, KVPath
from decode_svc.kv_landing import KVLanding
from engine.async_engine import AsyncEngine, RequestStream
from engine.output import RequestOutput
from engine.sampling_params import SamplingParams
from kvtransfer import KVReceiver
from protos import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2_grpc
from protos.channels import ChannelCache
from protos.convert import deadline_ns, load_report, logprob_to_proto, sampling_from_proto
from protos.errors import EARLY_END_ERRORS, InvalidArgument, Unavailable, statuses
from protos.serving import CHANNEL_OPTIONS
from protos.tls import TLSConfig, aio_channel


class DecodeServicer(decode_pb2_grpc.DecodeServiceServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        receiver: KVReceiver,
        landing: KVLanding,
        kv_backend: str,
        kv_address: str,
        request_timeout_s: float,
        tls: TLSConfig | None = None,
    ) -> None:
        self.tls = tls
        self.engine, self.receiver = engine, receiver
        self.kv = KVPath(receiver, landing, kv_backend, kv_address)
        self.request_timeout_s = request_timeout_s
        cfg = engine.engine.cfg
        self.admissions = Admissions(engine, cfg.page_size, cfg.max_num_seqs)
        self._channels = ChannelCache(lambda address: aio_channel(address, self.tls, CHANNEL_OPTIONS))
        self._seed_rng = random.Random()

    async def close(self) -> None:
        await self._channels.close()

    def _prefill(self, address: str) -> prefill_pb2_grpc.PrefillServiceStub:
        return prefill_pb2_grpc.PrefillServiceStub(self._channels.get(address))

    async def GetLoad(self, request: Any, context: Any) -> Any:
        return load_report(
            self.engine.load,
            "decode",
            self.admissions.num_reserved_pages,
            self.receiver.num_pending,
            self.receiver.num_bytes_received,
        )

    async def Generate(
        self, request: decode_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[decode_pb2.GenerateResponse]:
        timing = common_pb2.TimingMarks()
        timing.CopyFrom(request.timing)
        timing.decode_received_ns = time.time_ns()
        request_id = request.request_id or uuid.uuid4().hex
        deadline = deadline_ns(request.deadline_unix_ns, self.request_timeout_s)
        async with statuses(context, "decode"):
            params = self._validate(request)
            address = request.prefill_address
            if address and params.seed is None:  # decided here: prefill samples the first token with it
                params = dataclasses.replace(params, seed=self._seed_rng.getrandbits(63))
            job = DecodeJob(self.engine, request_id, list(request.prompt_token_ids), params, deadline, timing)
            num_cached: int | None = None  # colocated: each output carries this engine's count
            if not address:
                stream = await job.run_here()
            else:
                await self.admissions.reserve(job)
                timing.decode_admitted_ns = time.time_ns()
                stream, num_cached = await job.fill(self._prefill, address, self.kv, self.admissions)
            async for msg in self._stream(stream, num_cached, timing):
                yield msg

    async def _stream(
        self, stream: RequestStream, num_cached: int | None, timing: common_pb2.TimingMarks
    ) -> AsyncIterator[decode_pb2.GenerateResponse]:
        """``num_cached``: prompt tokens prefill found cached; None for a colocated request, whose
        outputs carry this engine's count, and whose first token also marks ``prefill_done_ns`` and
        ``transfer_done_ns`` (nothing is transferred)."""
        first = True
        try:
            async for out in stream:
                if out.finish_reason == "error" and self.engine.failure is not None:
                    raise Unavailable(f"decode engine: {self.engine.failure!r}")
                reason = out.finish_reason
                if reason in EARLY_END_ERRORS:
                    raise EARLY_END_ERRORS[reason](f"request {out.request_id}: {reason}")
                if first and num_cached is None:
                    timing.prefill_done_ns = timing.transfer_done_ns = time.time_ns()
                if out.num_output_tokens == 2 and out.new_token_ids:
                    timing.first_decode_token_ns = time.time_ns()
                if out.finished:
                    timing.finished_ns = time.time_ns()
                cached = out.num_cached_tokens if num_cached is None else num_cached
                yield _response(out, cached, timing if first or out.finished else None)
                first = False
        finally:
            stream.close()

    def _validate(self, request: decode_pb2.GenerateRequest) -> SamplingParams:
        try:
            params = sampling_from_proto(request.sampling)
        except ValueError as e:
            raise InvalidArgument(f"sampling.{e}") from e
        if not request.prompt_token_ids:
            raise InvalidArgument("prompt_token_ids: must not be empty")
        return params


def _response(out: RequestOutput, num_cached: int, timing: common_pb2.TimingMarks | None) -> Any:
    return decode_pb2.GenerateResponse(
        token_ids=out.new_token_ids,
        text=out.new_text,
        logprobs=[logprob_to_proto(lp) for lp in out.logprobs],
        finish_reason=out.finish_reason or "",
        usage=decode_pb2.Usage(
            prompt_tokens=out.num_prompt_tokens,
            completion_tokens=out.num_output_tokens,
            cached_tokens=num_cached,
        ),
        timing=timing,
    )
