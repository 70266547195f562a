"""The control plane every backend shares: one gRPC ``Handshake`` per (sender, receiver) comparing
``KVLayout``s and backends, and one ``PushKV`` client stream per transfer — a header, one data
message per layer (or per chunk of one), a commit — answered by an ack once every (layer, page) is
in the receiver's pool. Deadlines, abort and the receiver's exactly-once bookkeeping live here.

A backend subclasses ``StreamReceiver`` / ``StreamSender`` / ``StreamSession`` and supplies only
the data plane: ``tcp`` carries the bytes in the data messages, ``cuda_ipc`` and ``nccl`` send them
empty, as notices, and move the bytes on the GPUs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
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
DRAINED_KEY = "pdserve-kv-drained"  # trailer: the receiver consumed the whole stream before answering
_QUEUE_CHUNKS = 8  # data messages buffered ahead of the network: bounds the sender's extra memory
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


def layout_to_proto(layout: KVLayout) -> kvtransfer_pb2.KVLayout:
    return kvtransfer_pb2.KVLayout(**vars(layout))


def layout_from_proto(msg: kvtransfer_pb2.KVLayout) -> KVLayout:
    return KVLayout(**{f: getattr(msg, f) for f in KVLayout.__dataclass_fields__})


def host_id() -> str:
    """Equal in two processes exactly when they run on one host (same boot of the same machine)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "no-boot-id"
    return f"{socket.gethostname()}/{boot}"


class StreamReceiver(KVReceiver, kvtransfer_pb2_grpc.KVTransferServicer):
    """Decode side. ``drains``: after a failure or abort keep consuming data messages to the end of
    the stream (``on_data`` with ``pending=None``) — nccl needs a receive for every send posted."""

    backend = ""
    drains = False

    def __init__(self, layout: KVLayout, pool: Any) -> None:
        super().__init__()
        self.layout, self.pool = layout, pool

    # ---- the data plane (subclasses) ----
    def peer_info(self) -> kvtransfer_pb2.PeerInfo:
        return kvtransfer_pb2.PeerInfo(backend=self.backend, host_id=host_id())

    async def on_handshake(self, peer: kvtransfer_pb2.PeerInfo) -> kvtransfer_pb2.PeerInfo:
        """Check and set up the sender (raise ``TransferError`` to refuse); returns our ``PeerInfo``."""
        return self.peer_info()

    def begin(self, header: kvtransfer_pb2.KVHeader, pending: PendingTransfer | None) -> Any:
        """Per-stream state; ``pending`` is None when the transfer is refused (draining backends)."""
        return None

    async def on_data(self, state: Any, pending: PendingTransfer | None, data: kvtransfer_pb2.KVData) -> None:
        """Write one data message's pages (``pending`` None: a refused or ended transfer; consume only)."""
        raise NotImplementedError

    async def before_ack(self, state: Any, pending: PendingTransfer) -> None:
        """Return once everything ``on_data`` wrote is in the pool."""

    async def settle(self, state: Any) -> None:
        """The stream is consumed (a commit, or its end): finish what ``on_data`` started."""

    def end(self, state: Any, drained: bool) -> None:
        """The stream is over (``drained``: consumed to its end, or committed)."""

    # ---- the shared control plane ----
    def add_to_server(self, server: Any) -> None:
        kvtransfer_pb2_grpc.add_KVTransferServicer_to_server(self, server)

    async def Handshake(self, request: kvtransfer_pb2.HandshakeRequest, context: Any) -> Any:
        problems = self.layout.mismatches(layout_from_proto(request.layout))
        if problems:
            await context.abort(
                FAILED_PRECONDITION,
                "KV layout mismatch (ours = receiver/decode, theirs = sender/prefill): "
                + "; ".join(problems),
            )
        if request.peer.backend != self.backend:
            await context.abort(
                FAILED_PRECONDITION,
                f"kv backend mismatch: receiver/decode runs {self.backend!r}, sender/prefill "
                f"{request.peer.backend!r} (start both with the same --kv-backend)",
            )
        try:
            peer = await self.on_handshake(request.peer)
        except TransferError as e:
            await context.abort(e.code, e.message)
        return kvtransfer_pb2.HandshakeResponse(receiver=layout_to_proto(self.layout), peer=peer)

    async def PushKV(self, request_iterator: AsyncIterator[kvtransfer_pb2.KVChunk], context: Any) -> Any:
        pending: PendingTransfer | None = None
        failure: TransferError | None = None
        state, started, drained = None, False, False
        try:
            async for chunk in request_iterator:
                kind = chunk.WhichOneof("kind")
                if not started:
                    if kind != "header":
                        raise TransferError(INVALID_ARGUMENT, "a transfer starts with a header")
                    started = True
                    try:
                        pending = self._open(chunk.header)
                        written = torch.zeros(self.layout.num_layers, len(pending.page_ids), dtype=torch.bool)
                    except TransferError as e:
                        failure = e
                    if failure is None or self.drains:
                        state = self.begin(chunk.header, pending)
                elif failure is None and pending is not None and pending.result.done():
                    failure = pending.result.result().error or TransferError(
                        grpc.StatusCode.ABORTED, "transfer ended"
                    )
                if failure is not None and not self.drains:
                    raise failure
                if kind == "header":
                    continue
                if kind == "data":
                    live = pending if failure is None else None
                    if live is not None:
                        self._check_range(live, chunk.data, written)
                    await self.on_data(state, live, chunk.data)
                    if live is not None:
                        self._count(live, chunk.data, written)
                elif kind == "commit":  # the last message: every notice before it was consumed
                    await self.settle(state)
                    drained = True
                    if failure is not None:
                        raise failure
                    assert pending is not None, "a live transfer was opened"
                    return await self._commit(state, pending, chunk.commit, written)
                else:
                    raise TransferError(INVALID_ARGUMENT, f"unexpected {kind} chunk")
            await self.settle(state)
            drained = True
            raise failure or TransferError(
                grpc.StatusCode.ABORTED, "the sender closed the stream before committing"
            )
        except TransferError as e:
            if pending is not None:
                pending.finish(TransferState.FAILED, e)
            self.end(state, drained)
            if drained:
                context.set_trailing_metadata(((DRAINED_KEY, "1"),))
            await context.abort(e.code, e.message)
        except asyncio.CancelledError:
            if pending is not None:
                pending.finish(
                    TransferState.ABORTED, TransferError(grpc.StatusCode.ABORTED, "the sender went away")
                )
            self.end(state, False)
            raise

    async def _commit(
        self, state: Any, pending: PendingTransfer, commit: kvtransfer_pb2.KVCommit, written: torch.Tensor
    ) -> kvtransfer_pb2.KVAck:
        if not bool(written.all()):
            missing = int((~written).sum())
            raise TransferError(INVALID_ARGUMENT, f"commit with {missing} (layer, page) pairs unsent")
        await self.before_ack(state, pending)
        if pending.result.done():  # aborted or past its deadline while the last writes finished
            raise pending.result.result().error or TransferError(grpc.StatusCode.ABORTED, "transfer ended")
        logprob = logprob_from_proto(commit.first_logprob) if commit.HasField("first_logprob") else None
        pending.finish(TransferState.DONE, first_token=commit.first_token_id, first_logprob=logprob)
        self.end(state, True)
        return kvtransfer_pb2.KVAck(transfer_id=pending.transfer_id, num_bytes=pending.num_bytes)

    def _open(self, header: kvtransfer_pb2.KVHeader) -> PendingTransfer:
        if header.layout_digest != self.layout.digest:
            raise TransferError(
                FAILED_PRECONDITION,
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
                INVALID_ARGUMENT,
                f"transfer {header.transfer_id}: sender has {header.num_pages} pages / "
                f"{header.num_tokens} tokens, receiver reserved {len(pending.page_ids)} / {pending.num_tokens}",
            )
        return pending

    def _check_range(
        self, pending: PendingTransfer, data: kvtransfer_pb2.KVData, written: torch.Tensor
    ) -> None:
        lo, hi = data.first_page, data.first_page + data.num_pages
        if data.layer >= self.layout.num_layers or data.num_pages == 0 or hi > len(pending.page_ids):
            raise TransferError(INVALID_ARGUMENT, f"chunk layer {data.layer} pages [{lo}, {hi}) out of range")
        if bool(written[data.layer, lo:hi].any()):
            raise TransferError(INVALID_ARGUMENT, f"chunk layer {data.layer} pages [{lo}, {hi}) sent twice")

    def _count(self, pending: PendingTransfer, data: kvtransfer_pb2.KVData, written: torch.Tensor) -> None:
        written[data.layer, data.first_page : data.first_page + data.num_pages] = True
        num_bytes = data.num_pages * self.layout.page_size * self.layout.bytes_per_token_layer
        pending.num_bytes += num_bytes
        self.num_bytes_received += num_bytes


class StreamSender(KVSender):
    """Prefill side: gRPC channels, the handshake once per receiver address, sessions."""

    backend = ""

    def __init__(self, layout: KVLayout, pool: Any, tls: TLSConfig | None = None) -> None:
        self.layout, self.pool, self.tls = layout, pool, tls
        self.sender_id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._handshaken: set[str] = set()
        self.num_bytes_sent = 0

    def peer_info(self) -> kvtransfer_pb2.PeerInfo:
        return kvtransfer_pb2.PeerInfo(backend=self.backend, host_id=host_id(), sender_id=self.sender_id)

    async def on_connected(self, address: str, peer: kvtransfer_pb2.PeerInfo) -> None:
        """Set up the data plane with the receiver that answered ``peer`` (raise to refuse)."""

    def session(
        self, dest: Destination, src_pages: Sequence[int], num_tokens: int, deadline_ns: int
    ) -> StreamSession:
        raise NotImplementedError

    def stub(self, address: str) -> kvtransfer_pb2_grpc.KVTransferStub:
        if address not in self._channels:
            self._channels[address] = aio_channel(address, self.tls, CHANNEL_OPTIONS)
        return kvtransfer_pb2_grpc.KVTransferStub(self._channels[address])

    def forget(self, address: str) -> None:
        """Handshake again before the next transfer to ``address`` (its data plane broke)."""
        self._handshaken.discard(address)

    async def connect(self, address: str, deadline_ns: int) -> None:
        if address in self._handshaken:
            return
        request = kvtransfer_pb2.HandshakeRequest(layout=layout_to_proto(self.layout), peer=self.peer_info())
        try:
            reply = await self.stub(address).Handshake(request, timeout=remaining_s(deadline_ns))
        except grpc.aio.AioRpcError as e:
            raise TransferError(e.code(), f"handshake with {address}: {e.details()}") from None
        problems = self.layout.mismatches(layout_from_proto(reply.receiver))
        if problems:  # the receiver checks too; this guards against a receiver that does not
            raise TransferError(
                FAILED_PRECONDITION, f"KV layout mismatch with {address}: {'; '.join(problems)}"
            )
        await self.on_connected(address, reply.peer)
        self._handshaken.add(address)

    async def open(
        self, dest: Destination, src_pages: Sequence[int], num_tokens: int, deadline_ns: int
    ) -> SendSession:
        assert len(src_pages) == len(dest.page_ids), (
            f"{len(src_pages)} pages for {len(dest.page_ids)} destinations"
        )
        await self.connect(dest.address, deadline_ns)
        return self.session(dest, src_pages, num_tokens, deadline_ns)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


class StreamSession(SendSession):
    """One ``PushKV`` call. Subclasses implement ``send_layer`` with ``put`` / ``put_notice``."""

    _END = None
    queue_size = _QUEUE_CHUNKS

    def __init__(
        self, sender: StreamSender, dest: Destination, src_pages: Sequence[int], num_tokens: int,
        deadline_ns: int, header_src_pages: bool = False,
    ) -> None:  # fmt: skip
        self.sender, self.dest, self.deadline_ns = sender, dest, deadline_ns
        self.src_pages = list(src_pages)
        self.header = kvtransfer_pb2.KVHeader(
            transfer_id=dest.transfer_id, layout_digest=sender.layout.digest, num_pages=len(dest.page_ids),
            num_tokens=num_tokens, sender_id=sender.sender_id,
            src_page_ids=self.src_pages if header_src_pages else [],
        )  # fmt: skip
        self.queue: asyncio.Queue[kvtransfer_pb2.KVChunk | None] = asyncio.Queue(self.queue_size)
        self.call = sender.stub(dest.address).PushKV(self._chunks(), timeout=remaining_s(deadline_ns))
        self.call_task = asyncio.ensure_future(self._finish_call())
        self.drained = False  # the call ended with the receiver having consumed the whole stream

    async def _chunks(self) -> AsyncIterator[kvtransfer_pb2.KVChunk]:
        yield kvtransfer_pb2.KVChunk(header=self.header)
        while (chunk := await self.queue.get()) is not self._END:
            yield chunk

    async def _finish_call(self) -> kvtransfer_pb2.KVAck:
        try:
            ack = await self.call
            self.drained = True
            return ack
        except grpc.aio.AioRpcError as e:
            self.drained = any(key == DRAINED_KEY for key, _ in e.trailing_metadata() or ())
            raise TransferError(e.code(), f"to {self.dest.address}: {e.details()}") from None

    def check_open(self) -> None:
        """Raise the receiver's error if it already answered, or DEADLINE_EXCEEDED."""
        if self.call_task.done():
            self.call_task.result()
            raise TransferError(grpc.StatusCode.INTERNAL, "the receiver answered before the commit")
        if remaining_s(self.deadline_ns) <= 0:
            raise TransferError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"transfer {self.dest.transfer_id}: deadline passed"
            )

    def put_notice(self, layer: int) -> None:
        """Queue "layer ``layer`` of every page" without waiting (the queue of a noticing session is
        unbounded): nothing can cancel the caller between this and what it launches next."""
        self.check_open()
        data = kvtransfer_pb2.KVData(layer=layer, first_page=0, num_pages=len(self.src_pages))
        self.queue.put_nowait(kvtransfer_pb2.KVChunk(data=data))

    async def put(self, chunk: kvtransfer_pb2.KVChunk | None) -> None:
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
        self.check_open()
        raise TransferError(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"transfer {self.dest.transfer_id}: deadline passed"
        )

    async def before_commit(self) -> None:
        """Return once the receiver may read everything sent (cuda_ipc: the sender's copies)."""

    async def commit(self, first_token: int, first_logprob: TokenLogprob | None) -> int:
        await self.before_commit()
        commit = kvtransfer_pb2.KVCommit(
            first_token_id=first_token, first_logprob=logprob_to_proto(first_logprob)
        )
        await self.put(kvtransfer_pb2.KVChunk(commit=commit))
        await self.put(self._END)
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
        self.consume_result()

    def consume_result(self) -> None:
        """An aborted session's error is already reported: keep asyncio from logging it again."""
        if self.call_task.done() and not self.call_task.cancelled():
            self.call_task.exception()
        else:
            self.call_task.add_done_callback(lambda t: t.cancelled() or t.exception())
