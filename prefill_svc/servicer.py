"""One prefill request: validate → queue in the engine (prompt only, first token sampled with the
request's own seed) → lease its pages → send them layer by layer to the decode instance → release
the lease once decode acknowledged (or on any error, abort or deadline) → answer with the first
token and the timing marks.

The pages are read as whole kv heads (``Engine.read_kv``) in ranges of layers: with tensor
parallelism each range is gathered from every rank between two steps (``call_on_ranks``), with one
rank it is read from the pool directly (the leased pages are written by no step)."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import grpc
import torch

from engine.async_engine import AsyncEngine, EngineFailed
from engine.distributed.kv_shards import layer_ranges
from kvtransfer import Destination, KVSender, TransferError
from protos import common_pb2, prefill_pb2, prefill_pb2_grpc
from protos.convert import EARLY_END_STATUS, deadline_ns, load_report, logprob_to_proto, sampling_from_proto

log = logging.getLogger("pdserve.prefill")


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        sender: KVSender,
        kv_backend: str,
        request_timeout_s: float,
        max_queued_requests: int = 4096,
    ) -> None:
        self.max_queued_requests = max_queued_requests
        self.engine, self.sender = engine, sender
        self.kv_backend, self.request_timeout_s = kv_backend, request_timeout_s
        self.model_config = engine.engine.model_config
        self.page_size, self.tp = engine.engine.cfg.page_size, engine.engine.cfg.tp
        self.num_leased_pages = 0
        self.num_sending = 0

    async def Prefill(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext) -> Any:
        timing = common_pb2.TimingMarks()
        timing.CopyFrom(request.timing)
        timing.prefill_received_ns = time.time_ns()
        deadline = deadline_ns(request.deadline_unix_ns, self.request_timeout_s)
        params = await self._validate(request, context)
        try:  # before any work: a layout mismatch is FAILED_PRECONDITION, whatever else is off
            await self.sender.connect(request.kv_destination.address, deadline)
        except TransferError as e:
            await context.abort(e.code, e.message)
        dest = await self._destination(request, context)
        if len(self.engine.engine.scheduler.waiting) >= self.max_queued_requests:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"prefill queue is full ({self.max_queued_requests} waiting); retry later or elsewhere",
            )
        prompt = list(request.prompt_token_ids)
        first_only = dataclasses.replace(params, max_tokens=1, stop=(), ignore_eos=True)
        try:
            stream = await self.engine.generate(
                request.request_id, prompt, first_only, deadline, hold_kv=True
            )
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EngineFailed as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill engine: {e}")
        outputs = [out async for out in stream]
        final = outputs[-1]
        if final.finish_reason == "error" and self.engine.failure is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill engine: {self.engine.failure!r}")
        if final.finish_reason in EARLY_END_STATUS:
            await context.abort(
                EARLY_END_STATUS[final.finish_reason],
                f"prefill of {request.request_id}: {final.finish_reason}",
            )
        pages = final.kv_pages or []
        self.num_leased_pages += len(pages)
        self.num_sending += 1
        try:
            assert len(pages) == len(dest.page_ids), (
                "a held request ends with one lease page per destination page"
            )
            timing.prefill_started_ns, timing.prefill_done_ns = final.admitted_ns, time.time_ns()
            first_token = final.new_token_ids[0]
            first_logprob = final.logprobs[0] if final.logprobs else None
            async with await self.sender.open(dest, pages, len(prompt), deadline) as session:
                if self.tp == 1:  # the sender reads its own pool: the leased pages hold the whole KV
                    for layer in range(self.model_config.num_layers):
                        await session.send_layer(layer)
                else:  # rank 0's pool is a shard: every rank's heads, joined (Engine.read_kv)
                    for layers in layer_ranges(self.model_config, self.page_size, len(pages)):
                        kv = await self._read_kv(layers, pages)  # [layers, 2, pages, page_size, heads, dim]
                        for i, layer in enumerate(layers):
                            await session.send_layer(layer, kv[i])
                await session.commit(first_token, first_logprob)
        except _EngineDown as e:  # a tensor-parallel rank died while its KV was read
            log.error("request %s: reading its KV failed: %s", request.request_id, e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill engine: {e}")
        except Exception as exc:  # a transfer error, or a backend's own (CUDA, NCCL): the transfer failed
            err = (
                exc if isinstance(exc, TransferError) else TransferError(grpc.StatusCode.INTERNAL, repr(exc))
            )
            log.warning("request %s: KV transfer failed: %s", request.request_id, err)
            await context.abort(err.code, f"KV transfer to {dest.address}: {err.message}")
        finally:  # the lease ends here: acknowledged, failed, aborted or past the deadline
            self.num_leased_pages -= len(pages)
            self.num_sending -= 1
            self.engine.call_soon(lambda e: e.free_pages(pages))
        timing.transfer_done_ns = time.time_ns()
        return prefill_pb2.PrefillResponse(
            first_token_id=first_token,
            first_logprob=logprob_to_proto(first_logprob),
            num_cached_tokens=final.num_cached_tokens,
            timing=timing,
        )

    async def _read_kv(self, layers: range, pages: list[int]) -> torch.Tensor:
        try:
            return await self.engine.call_on_ranks(lambda e: e.read_kv(pages, layers))
        except RuntimeError as e:  # EngineFailed included
            raise _EngineDown(str(e)) from e

    async def _validate(self, request: prefill_pb2.PrefillRequest, context: Any) -> Any:
        try:
            params = sampling_from_proto(request.sampling)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling.{e}")
        problems = []
        if not request.request_id:
            problems.append("request_id: required")
        if not request.sampling.HasField("seed"):
            problems.append("sampling.seed: required (decode picks it so both sides sample alike)")
        kv = request.kv_destination
        if not kv.address or not kv.transfer_id:
            problems.append("kv_destination: address and transfer_id are required")
        if problems:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))
        return params

    async def _destination(self, request: prefill_pb2.PrefillRequest, context: Any) -> Destination:
        problems = []
        kv = request.kv_destination
        if kv.backend != self.kv_backend:
            problems.append(
                f"kv_destination.backend: this instance sends with {self.kv_backend!r}, not {kv.backend!r}"
            )
        num_pages = -(-len(request.prompt_token_ids) // self.page_size)
        if len(kv.page_ids) != num_pages:
            num_tokens = len(request.prompt_token_ids)
            problems.append(
                f"kv_destination.page_ids: {len(kv.page_ids)} pages for a {num_tokens}-token prompt "
                f"(need {num_pages})"
            )
        if problems:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))
        return Destination(kv.address, kv.transfer_id, tuple(kv.page_ids))

    async def GetLoad(self, request: Any, context: Any) -> Any:
        return load_report(
            self.engine.engine, "prefill", self.num_leased_pages, self.num_sending, self.sender.num_bytes_sent
        )


class _EngineDown(Exception):
    """The engine could not read a request's KV (a tensor-parallel rank is gone)."""
