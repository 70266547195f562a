"""The ``tcp`` backend: KV pages as raw bytes inside the shared ``PushKV`` stream (``stream.py``).
Works on any host and any device (pages are staged through host memory); the CPU path and the
cross-host fallback.

Each layer goes as data messages of at most ``max_chunk_bytes`` (one layer's K/V for a run of
pages). The receiver writes each chunk into its reserved pages as it arrives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import torch

from kvtransfer.base import Destination, PendingTransfer, TransferError
from kvtransfer.layout import KVLayout
from kvtransfer.stream import INVALID_ARGUMENT, StreamReceiver
from kvtransfer.stream_send import StreamSender, StreamSession
from protos import kvtransfer_pb2
from protos.tls import TLSConfig


class TcpReceiver(StreamReceiver):
    backend = "tcp"

    def begin(self, header: kvtransfer_pb2.KVHeader, pending: PendingTransfer | None) -> Any:
        return None if pending is None else torch.tensor(pending.page_ids, dtype=torch.int64)

    async def on_data(self, state: Any, pending: PendingTransfer | None, data: kvtransfer_pb2.KVData) -> None:
        assert pending is not None, "tcp does not drain"
        lay = self.layout
        shape = (2, data.num_pages, lay.page_size, lay.num_kv_heads, lay.head_dim)
        expected = data.num_pages * lay.page_size * lay.bytes_per_token_layer
        if len(data.kv) != expected:
            raise TransferError(INVALID_ARGUMENT, f"chunk has {len(data.kv)} bytes, expected {expected}")
        kv = torch.frombuffer(bytearray(data.kv), dtype=getattr(torch, lay.dtype)).view(shape)
        device = self.pool.kv_gpu.device
        pages_cpu = state[data.first_page : data.first_page + data.num_pages]
        self.pool.write_pages(data.layer, pages_cpu.to(device), kv.to(device))


class TcpSender(StreamSender):
    """``chunk_delay_s`` is a fault hook for tests: a sleep before every data chunk (a slow link)."""

    backend = "tcp"

    def __init__(
        self,
        layout: KVLayout,
        pool: Any,
        max_chunk_bytes: int = 1 << 20,
        chunk_delay_s: float = 0.0,
        tls: TLSConfig | None = None,
    ) -> None:
        super().__init__(layout, pool, tls)
        self.max_chunk_bytes, self.chunk_delay_s = max_chunk_bytes, chunk_delay_s
        # Pages are read on a stream of their own: the engine's steps keep running on the default
        # stream, and a read queued there would wait for all of them (``SendSession.send_layer``).
        device = pool.kv_gpu.device
        self.read_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def session(
        self, dest: Destination, src_pages: Sequence[int], num_tokens: int, deadline_ns: int
    ) -> StreamSession:
        return _TcpSession(self, dest, src_pages, num_tokens, deadline_ns)


class _TcpSession(StreamSession):
    sender: TcpSender

    def __init__(self, sender: TcpSender, *args: Any) -> None:
        super().__init__(sender, *args)
        with torch.cuda.stream(sender.read_stream):  # None (CPU): no stream
            self.src_gpu = torch.tensor(self.src_pages, dtype=torch.int64, device=sender.pool.kv_gpu.device)

    async def send_layer(self, layer: int, kv: Any = None) -> None:
        stream = self.sender.read_stream  # None on CPU: no stream
        if kv is not None and stream is not None:
            stream.wait_stream(torch.cuda.current_stream(stream.device))  # ``kv`` was made there
        with torch.cuda.stream(stream):
            if kv is None:
                kv = self.sender.pool.read_pages(layer, self.src_gpu)  # [2, pages, page_size, kv_heads, dim]
        page_bytes = kv[:, :1].numel() * kv.element_size()
        step = max(1, self.sender.max_chunk_bytes // page_bytes)
        for lo in range(0, kv.shape[1], step):
            with torch.cuda.stream(stream):
                part = kv[:, lo : lo + step].contiguous().cpu()  # waits for the read stream only
            blob = part.view(torch.uint8).numpy().tobytes()
            data = kvtransfer_pb2.KVData(layer=layer, first_page=lo, num_pages=part.shape[1], kv=blob)
            if self.sender.chunk_delay_s:
                await asyncio.sleep(self.sender.chunk_delay_s)
            await self.put(kvtransfer_pb2.KVChunk(data=data))
            self.sender.num_bytes_sent += len(blob)
