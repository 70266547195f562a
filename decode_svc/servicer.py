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
from decode_svc.responses import Responses
from decode_svc.session import Session
from engine.async_engine import AsyncEngine, RequestStream
from engine.sampling_params import SamplingParams
from kvtransfer import KVReceiver
from protos import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2_grpc
from protos.channels import ChannelCache
from protos.convert import deadline_ns, load_report, sampling_from_proto
from protos.drain import Drain
from protos.errors import InvalidArgument, statuses
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
        self.drain = Drain(())  # the server's (``server.py``): sessions admit their requests through it

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
        async with statuses(context, "decode"):
            async for msg in self.generate(request):
                yield msg

    async def Session(
        self, requests: AsyncIterator[decode_pb2.SessionRequest], context: grpc.aio.ServicerContext
    ) -> None:
        await Session(self.start, self.drain).run(requests, context.write)

    async def generate(
        self, request: decode_pb2.GenerateRequest
    ) -> AsyncIterator[decode_pb2.GenerateResponse]:
        """One request's responses; its errors are raised (``protos.errors`` or the engine's types)."""
        stream, responses = await self.start(request)
        try:
            async for out in stream:
                msg = decode_pb2.GenerateResponse()
                responses.fill(msg, out)
                yield msg
        finally:
            stream.close()

    async def start(self, request: decode_pb2.GenerateRequest) -> tuple[RequestStream, Responses]:
        """Admit a request into this engine's batch (colocated: run here; else reserve → prefill
        fills the pages → adopt); returns its engine stream and what turns its outputs into
        responses."""
        timing = common_pb2.TimingMarks()
        timing.CopyFrom(request.timing)
        timing.decode_received_ns = time.time_ns()
        request_id = request.request_id or uuid.uuid4().hex
        deadline = deadline_ns(request.deadline_unix_ns, self.request_timeout_s)
        params = self._validate(request)
        address = request.prefill_address
        if address and params.seed is None:  # decided here: prefill samples the first token with it
            params = dataclasses.replace(params, seed=self._seed_rng.getrandbits(63))
        job = DecodeJob(self.engine, request_id, list(request.prompt_token_ids), params, deadline, timing)
        if not address:
            return await job.run_here(), Responses(self.engine, None, timing)
        await self.admissions.reserve(job)
        timing.decode_admitted_ns = time.time_ns()
        stream, num_cached = await job.fill(self._prefill, address, self.kv, self.admissions)
        return stream, Responses(self.engine, num_cached, timing)

    def _validate(self, request: decode_pb2.GenerateRequest) -> SamplingParams:
        try:
            params = sampling_from_proto(request.sampling)
        except ValueError as e:
            raise InvalidArgument(f"sampling.{e}") from e
        if not request.prompt_token_ids:
            raise InvalidArgument("prompt_token_ids: must not be empty")
        return params
