"""The control plane every backend shares: one gRPC ``Handshake`` per (sender, receiver) comparing
``KVLayout``s and backends, and one ``PushKV`` client stream per transfer — a header, one data
message per layer (or per chunk of one), a commit — answered by an ack once every (layer, page) is
in the receiver's pool. Deadlines, abort and the receiver's exactly-once bookkeeping live here.

A backend subclasses ``StreamReceiver`` (here) and ``StreamSender`` / ``StreamSession``
(``stream_send.py``) and supplies only
the data plane: ``tcp`` carries the bytes in the data messages, ``cuda_ipc`` and ``nccl`` send them
empty, as notices, and move the bytes on the GPUs.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import torch

from kvtransfer.base import (
    KVReceiver,
    PendingTransfer,
    TransferError,
    TransferState,
)
from kvtransfer.layout import KVLayout
from protos import kvtransfer_pb2, kvtransfer_pb2_grpc
from protos.convert import logprob_from_proto
from protos.guard import MalformedMessage

log = logging.getLogger(__name__)
DRAINED_KEY = "pdserve-kv-drained"  # trailer: the receiver consumed the whole stream before answering
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
INTERNAL = grpc.StatusCode.INTERNAL


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
        except Exception as exc:  # a backend's own error (CUDA, NCCL) ends the transfer like ours do
            if isinstance(exc, MalformedMessage):  # logged by the server's guard, rate-limited
                exc = TransferError(exc.code, exc.message)
            err = exc if isinstance(exc, TransferError) else TransferError(INTERNAL, f"receiver: {exc!r}")
            if not isinstance(exc, TransferError):
                log.exception("KV transfer receiver failed")
            if pending is not None:
                pending.finish(TransferState.FAILED, err)
            self.end(state, drained)
            if drained:
                context.set_trailing_metadata(((DRAINED_KEY, "1"),))
            await context.abort(err.code, err.message)
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
