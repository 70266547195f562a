"""The ``tcp`` backend: KV pages as a gRPC client stream (``KVTransfer.PushKV``). Works on any host
and any device (pages are staged through host memory); the CPU path and the cross-host fallback.

Wire format per transfer: a header (transfer id, layout digest, page and token counts), data chunks
of at most ``max_chunk_bytes`` (one layer's K/V for a run of pages, raw bytes), a commit with the
first token. The receiver writes each chunk into its reserved pages as it arrives and acknowledges
after the commit, once every (layer, page) was written exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import torch

from engine.output import TokenLogprob
from kvtransfer.base import (
    Destination,
    KVReceiver,
    KVSender,
    PendingTransfer,
    SendSession,
    TransferError,
    TransferState,
    remaining_s,
)
from kvtransfer.layout import KVLayout
from protos import kvtransfer_pb2, kvtransfer_pb2_grpc
from protos.convert import logprob_from_proto, logprob_to_proto
from protos.serving import CHANNEL_OPTIONS
from protos.tls import TLSConfig, aio_channel

log = logging.getLogger(__name__)
_QUEUE_CHUNKS = 8  # chunks buffered ahead of the network: bounds the sender's extra memory


def layout_to_proto(layout: KVLayout) -> kvtransfer_pb2.KVLayout:
    return kvtransfer_pb2.KVLayout(**vars(layout))


def layout_from_proto(msg: kvtransfer_pb2.KVLayout) -> KVLayout:
    return KVLayout(**{f: getattr(msg, f) for f in KVLayout.__dataclass_fields__})


class TcpReceiver(KVReceiver, kvtransfer_pb2_grpc.KVTransferServicer):
    def __init__(self, layout: KVLayout, pool: Any) -> None:
        super().__init__()
        self.layout, self.pool = layout, pool

    def add_to_server(self, server: Any) -> None:
        kvtransfer_pb2_grpc.add_KVTransferServicer_to_server(self, server)

    async def Handshake(self, request: kvtransfer_pb2.KVLayout, context: grpc.aio.ServicerContext) -> Any:
        problems = self.layout.mismatches(layout_from_proto(request))
        if problems:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "KV layout mismatch (ours = receiver/decode, theirs = sender/prefill): "
                + "; ".join(problems),
            )
        return kvtransfer_pb2.HandshakeResponse(receiver=layout_to_proto(self.layout))

    async def PushKV(self, request_iterator: AsyncIterator[kvtransfer_pb2.KVChunk], context: Any) -> Any:
        pending: PendingTransfer | None = None
        try:
            async for chunk in request_iterator:
                kind = chunk.WhichOneof("kind")
                if pending is None:
                    pending = self._open(chunk, kind)
                    written = torch.zeros(self.layout.num_layers, len(pending.page_ids), dtype=torch.bool)
                    pages_cpu = torch.tensor(pending.page_ids, dtype=torch.int64)
                elif pending.result.done():
                    raise pending.result.result().error or TransferError(
                        grpc.StatusCode.ABORTED, "transfer ended"
                    )
                elif kind == "data":
                    self._write(pending, chunk.data, written, pages_cpu)
                elif kind == "commit":
                    if not bool(written.all()):
                        missing = int((~written).sum())
                        raise TransferError(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"commit with {missing} (layer, page) pairs unsent",
                        )
                    lp = chunk.commit.first_logprob if chunk.commit.HasField("first_logprob") else None
                    logprob = logprob_from_proto(lp) if lp is not None else None
                    pending.finish(
                        TransferState.DONE, first_token=chunk.commit.first_token_id, first_logprob=logprob
                    )
                    return kvtransfer_pb2.KVAck(transfer_id=pending.transfer_id, num_bytes=pending.num_bytes)
                else:
                    raise TransferError(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected {kind} chunk")
            raise TransferError(grpc.StatusCode.ABORTED, "the sender closed the stream before committing")
        except TransferError as e:
            if pending is not None:
                pending.finish(TransferState.FAILED, e)
            await context.abort(e.code, e.message)
        except asyncio.CancelledError:
            if pending is not None:
                pending.finish(
                    TransferState.ABORTED, TransferError(grpc.StatusCode.ABORTED, "the sender went away")
                )
            raise

    def _open(self, chunk: kvtransfer_pb2.KVChunk, kind: str | None) -> PendingTransfer:
        if kind != "header":
            raise TransferError(grpc.StatusCode.INVALID_ARGUMENT, "a transfer starts with a header")
        header = chunk.header
        if header.layout_digest != self.layout.digest:
            raise TransferError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"layout digest {header.layout_digest} != ours {self.layout.digest}: handshake again",
            )
        pending = self.transfers.get(header.transfer_id)
        if pending is None:
            raise TransferError(
                grpc.StatusCode.NOT_FOUND,
                f"transfer {header.transfer_id} is not expected (aborted or expired?)",
            )
        if header.num_pages != len(pending.page_ids) or header.num_tokens != pending.num_tokens:
            raise TransferError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"transfer {header.transfer_id}: sender has {header.num_pages} pages / "
                f"{header.num_tokens} tokens, receiver reserved {len(pending.page_ids)} / {pending.num_tokens}",
            )
        return pending

    def _write(
        self,
        pending: PendingTransfer,
        data: kvtransfer_pb2.KVData,
        written: torch.Tensor,
        pages_cpu: torch.Tensor,
    ) -> None:
        lo, hi = data.first_page, data.first_page + data.num_pages
        if data.layer >= self.layout.num_layers or data.num_pages == 0 or hi > len(pending.page_ids):
            raise TransferError(
                grpc.StatusCode.INVALID_ARGUMENT, f"chunk layer {data.layer} pages [{lo}, {hi}) out of range"
            )
        if bool(written[data.layer, lo:hi].any()):
            raise TransferError(
                grpc.StatusCode.INVALID_ARGUMENT, f"chunk layer {data.layer} pages [{lo}, {hi}) sent twice"
            )
        lay = self.layout
        shape = (2, data.num_pages, lay.page_size, lay.num_kv_heads, lay.head_dim)
        expected = data.num_pages * lay.page_size * lay.bytes_per_token_layer
        if len(data.kv) != expected:
            raise TransferError(
                grpc.StatusCode.INVALID_ARGUMENT, f"chunk has {len(data.kv)} bytes, expected {expected}"
            )
        kv = torch.frombuffer(bytearray(data.kv), dtype=getattr(torch, lay.dtype)).view(shape)
        device = self.pool.kv_gpu.device
        self.pool.write_pages(data.layer, pages_cpu[lo:hi].to(device), kv.to(device))
        written[data.layer, lo:hi] = True
        pending.num_bytes += expected
        self.num_bytes_received += expected


class TcpSender(KVSender):
    """``chunk_delay_s`` is a fault hook for tests: a sleep before every data chunk (a slow link)."""

    def __init__(
        self,
        layout: KVLayout,
        pool: Any,
        max_chunk_bytes: int = 1 << 20,
        chunk_delay_s: float = 0.0,
        tls: TLSConfig | None = None,
    ) -> None:
        self.tls = tls
        self.layout, self.pool = layout, pool
        self.max_chunk_bytes, self.chunk_delay_s = max_chunk_bytes, chunk_delay_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._handshaken: set[str] = set()
        self.num_bytes_sent = 0

    def _stub(self, address: str) -> kvtransfer_pb2_grpc.KVTransferStub:
        if address not in self._channels:
            self._channels[address] = aio_channel(address, self.tls, CHANNEL_OPTIONS)
        return kvtransfer_pb2_grpc.KVTransferStub(self._channels[address])

    async def connect(self, address: str, deadline_ns: int) -> None:
        if address in self._handshaken:
            return
        try:
            reply = await self._stub(address).Handshake(
                layout_to_proto(self.layout), timeout=remaining_s(deadline_ns)
            )
        except grpc.aio.AioRpcError as e:
            raise TransferError(e.code(), f"handshake with {address}: {e.details()}") from None
        problems = self.layout.mismatches(layout_from_proto(reply.receiver))
        if problems:  # the receiver checks too; this guards against a receiver that does not
            raise TransferError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"KV layout mismatch with {address}: {'; '.join(problems)}",
            )
        self._handshaken.add(address)

    async def open(self, dest: Destination, num_tokens: int, deadline_ns: int) -> SendSession:
        await self.connect(dest.address, deadline_ns)
        return _TcpSession(self, dest, num_tokens, deadline_ns)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


class _TcpSession(SendSession):
    _END = None

    def __init__(self, sender: TcpSender, dest: Destination, num_tokens: int, deadline_ns: int) -> None:
        self.sender, self.dest, self.deadline_ns = sender, dest, deadline_ns
        self.header = kvtransfer_pb2.KVHeader(
            transfer_id=dest.transfer_id, layout_digest=sender.layout.digest,
            num_pages=len(dest.page_ids), num_tokens=num_tokens,
        )  # fmt: skip
        self.queue: asyncio.Queue[kvtransfer_pb2.KVChunk | None] = asyncio.Queue(_QUEUE_CHUNKS)
        self.call = sender._stub(dest.address).PushKV(self._chunks(), timeout=remaining_s(deadline_ns))
        self.call_task = asyncio.ensure_future(self._finish_call())

    async def _chunks(self) -> AsyncIterator[kvtransfer_pb2.KVChunk]:
        yield kvtransfer_pb2.KVChunk(header=self.header)
        while (chunk := await self.queue.get()) is not self._END:
            if chunk.HasField("data") and self.sender.chunk_delay_s:
                await asyncio.sleep(self.sender.chunk_delay_s)
            yield chunk

    async def _finish_call(self) -> kvtransfer_pb2.KVAck:
        try:
            return await self.call
        except grpc.aio.AioRpcError as e:
            raise TransferError(e.code(), f"to {self.dest.address}: {e.details()}") from None

    async def _put(self, chunk: kvtransfer_pb2.KVChunk | None) -> None:
        put = asyncio.ensure_future(self.queue.put(chunk))
        try:
            await asyncio.wait(
                {put, self.call_task},
                timeout=remaining_s(self.deadline_ns),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            if not put.done():
                put.cancel()
        if put.done() and not put.cancelled():
            return
        if self.call_task.done():
            self.call_task.result()  # raises the receiver's error
            raise TransferError(grpc.StatusCode.INTERNAL, "the receiver answered before the commit")
        raise TransferError(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"transfer {self.dest.transfer_id}: deadline passed"
        )

    async def send_layer(self, layer: int, kv: torch.Tensor) -> None:
        # kv [2, num_pages, page_size, num_kv_heads, head_dim]
        num_pages = kv.shape[1]
        assert num_pages == len(self.dest.page_ids), (
            f"{num_pages} pages for {len(self.dest.page_ids)} destinations"
        )
        page_bytes = kv[:, :1].numel() * kv.element_size()
        step = max(1, self.sender.max_chunk_bytes // page_bytes)
        for lo in range(0, num_pages, step):
            part = kv[:, lo : lo + step].contiguous().cpu()
            blob = part.view(torch.uint8).numpy().tobytes()
            data = kvtransfer_pb2.KVData(layer=layer, first_page=lo, num_pages=part.shape[1], kv=blob)
            await self._put(kvtransfer_pb2.KVChunk(data=data))
            self.sender.num_bytes_sent += len(blob)

    async def commit(self, first_token: int, first_logprob: TokenLogprob | None) -> int:
        commit = kvtransfer_pb2.KVCommit(
            first_token_id=first_token, first_logprob=logprob_to_proto(first_logprob)
        )
        await self._put(kvtransfer_pb2.KVChunk(commit=commit))
        await self._put(self._END)
        start = time.monotonic()
        try:
            ack = await asyncio.wait_for(asyncio.shield(self.call_task), remaining_s(self.deadline_ns))
        except TimeoutError:
            self.abort()
            raise TransferError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"transfer {self.dest.transfer_id}: no ack by the deadline"
            ) from None
        log.debug("transfer %s acked after %.1f ms", self.dest.transfer_id, (time.monotonic() - start) * 1e3)
        return int(ack.num_bytes)

    def abort(self) -> None:
        self.call.cancel()
        if self.call_task.done() and not self.call_task.cancelled():
            self.call_task.exception()  # consumed: an aborted session's error is already reported
        else:
            self.call_task.add_done_callback(lambda t: t.cancelled() or t.exception())
