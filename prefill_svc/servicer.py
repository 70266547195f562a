"""The prefill service's RPCs. One ``Prefill``: validate → check the KV layout with the decode
instance → queue the prompt in the engine (first token sampled with the request's own seed) → lease
its pages → send them to the decode instance → release the lease once decode acknowledged (or on
any error, abort or deadline) → answer with the first token and the timing marks. The request's
state and the transfer live in ``job.PrefillJob``; errors are ``protos.errors`` types, turned into
statuses in one place (``statuses``)."""

from __future__ import annotations

import time
from typing import Any

import grpc

from engine.async_engine import AsyncEngine
from engine.sampling_params import SamplingParams
from kvtransfer import Destination, KVSender, TransferError
from prefill_svc.job import PrefillJob
from protos import common_pb2, prefill_pb2, prefill_pb2_grpc
from protos.convert import deadline_ns, load_report, sampling_from_proto
from protos.errors import InvalidArgument, Relayed, ResourceExhausted, statuses


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        sender: KVSender,
        kv_backend: str,
        request_timeout_s: float,
        max_queued_requests: int = 4096,
        layerwise: bool = True,
    ) -> None:
        self.max_queued_requests = max_queued_requests
        self.engine, self.sender = engine, sender
        self.kv_backend, self.request_timeout_s = kv_backend, request_timeout_s
        self.page_size, self.tp = engine.engine.cfg.page_size, engine.engine.cfg.tp
        # Layer by layer needs the whole heads in this rank's pool (``prefill_svc.job``).
        self.layerwise = layerwise and self.tp == 1
        self._jobs: set[PrefillJob] = set()

    async def Prefill(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext) -> Any:
        timing = common_pb2.TimingMarks()
        timing.CopyFrom(request.timing)
        timing.prefill_received_ns = time.time_ns()
        deadline = deadline_ns(request.deadline_unix_ns, self.request_timeout_s)
        async with statuses(context, "prefill"):
            params = self._validate(request)
            await self._connect(request.kv_destination.address, deadline)
            dest = self._destination(request)
            self._check_queue()
            job = PrefillJob(self.engine, request, params, dest, deadline, timing)
            self._jobs.add(job)
            try:
                await job.run(self.layerwise)
                await job.take_lease()
                await job.send(self.sender, self.tp, self.page_size)
            finally:
                job.finish()
                self._jobs.discard(job)
            return job.response()

    async def GetLoad(self, request: Any, context: Any) -> Any:
        held = [job.num_held_pages for job in self._jobs if job.num_held_pages]
        return load_report(self.engine.load, "prefill", sum(held), len(held), self.sender.num_bytes_sent)

    def _validate(self, request: prefill_pb2.PrefillRequest) -> SamplingParams:
        try:
            params = sampling_from_proto(request.sampling)
        except ValueError as e:
            raise InvalidArgument(f"sampling.{e}") from e
        problems = []
        if not request.request_id:
            problems.append("request_id: required")
        if not request.sampling.HasField("seed"):
            problems.append("sampling.seed: required (decode picks it so both sides sample alike)")
        kv = request.kv_destination
        if not kv.address or not kv.transfer_id:
            problems.append("kv_destination: address and transfer_id are required")
        if problems:
            raise InvalidArgument("; ".join(problems))
        return params

    async def _connect(self, address: str, deadline: int) -> None:
        """Before any work: a layout mismatch is FAILED_PRECONDITION, whatever else is off."""
        try:
            await self.sender.connect(address, deadline)
        except TransferError as e:
            raise Relayed(e.code, e.message) from e

    def _destination(self, request: prefill_pb2.PrefillRequest) -> Destination:
        problems = []
        kv = request.kv_destination
        if kv.backend != self.kv_backend:
            problems.append(
                f"kv_destination.backend: this instance sends with {self.kv_backend!r}, not {kv.backend!r}"
            )
        num_tokens = len(request.prompt_token_ids)
        num_pages = -(-num_tokens // self.page_size)
        if len(kv.page_ids) != num_pages:
            problems.append(
                f"kv_destination.page_ids: {len(kv.page_ids)} pages for a {num_tokens}-token prompt "
                f"(need {num_pages})"
            )
        if problems:
            raise InvalidArgument("; ".join(problems))
        return Destination(kv.address, kv.transfer_id, tuple(kv.page_ids))

    def _check_queue(self) -> None:
        if self.engine.load.num_waiting >= self.max_queued_requests:
            raise ResourceExhausted(
                f"prefill queue is full ({self.max_queued_requests} waiting); retry later or elsewhere"
            )
