"""A KV sender in its own process, for the GPU transfer tests and ``kv_transfer_bench.py``: the
real backends need two processes (CUDA IPC maps another process's memory; NCCL pairs two ranks).

``SenderProcess(backend, device, shape, seed)`` spawns a child holding a ``KVPagePool`` filled by
``fill_pool`` (the same seed gives the same contents on any GPU, so the parent can rebuild the
expected pages); ``run(transfers)`` sends them concurrently and returns one ``Outcome`` each, with
the time from the first ``send_layer`` to the acknowledged commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class PoolShape:
    num_layers: int
    num_pages: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"

    def layout(self) -> Any:
        from kvtransfer import KVLayout

        return KVLayout(
            "bench", self.dtype, self.num_layers, self.num_kv_heads, self.head_dim, self.page_size
        )

    def pool(self, device: str) -> Any:
        from engine.kvcache.page_pool import KVPagePool

        return KVPagePool(
            self.num_layers, self.num_pages, self.page_size, self.num_kv_heads, self.head_dim,
            getattr(torch, self.dtype), device,
        )  # fmt: skip


def fill_pool(pool: Any, seed: int) -> None:
    """Random contents, layer by layer (bounded temporary memory); page 0 stays zero."""
    g = torch.Generator(device=pool.kv_gpu.device).manual_seed(seed)
    for layer in range(pool.num_layers):
        src = torch.randn(pool.kv_gpu[layer].shape, generator=g, device=pool.kv_gpu.device)
        pool.kv_gpu[layer].copy_(src)
    pool.kv_gpu[:, :, 0] = 0


@dataclass(frozen=True)
class Transfer:
    address: str
    transfer_id: str
    src_pages: tuple[int, ...]
    dst_pages: tuple[int, ...]
    num_tokens: int
    deadline_s: float = 30.0
    layer_delay_s: float = 0.0  # pause before each layer (tests: abort and deadline mid-transfer)
    layers: tuple[int, ...] | None = None  # the order layers go in (default: 0..L-1)


@dataclass
class Outcome:
    transfer_id: str
    ok: bool
    code: str = ""
    message: str = ""
    seconds: float = 0.0  # first send_layer → commit acknowledged
    num_bytes: int = 0
    extra: dict = field(default_factory=dict)


async def _send(sender: Any, t: Transfer, num_layers: int) -> Outcome:
    from kvtransfer import Destination, TransferError

    deadline = time.time_ns() + int(t.deadline_s * 1e9)
    try:
        await sender.connect(t.address, deadline)  # the handshake is not part of the timing
        start = time.perf_counter()
        dest = Destination(t.address, t.transfer_id, t.dst_pages)
        async with await sender.open(dest, t.src_pages, t.num_tokens, deadline) as session:
            for layer in t.layers if t.layers is not None else range(num_layers):
                if t.layer_delay_s:
                    await asyncio.sleep(t.layer_delay_s)
                await session.send_layer(layer)
            num_bytes = await session.commit(7, None)
        return Outcome(t.transfer_id, True, seconds=time.perf_counter() - start, num_bytes=num_bytes)
    except TransferError as e:
        return Outcome(t.transfer_id, False, e.code.name, e.message)


async def _send_all(sender: Any, transfers: list[Transfer], num_layers: int) -> list[Outcome]:
    return list(await asyncio.gather(*(_send(sender, t, num_layers) for t in transfers)))


def _child(conn: Any, backend: str, device: str, shape: PoolShape, seed: int) -> None:
    from kvtransfer import create_sender

    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    pool = shape.pool(device)
    fill_pool(pool, seed)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    sender = create_sender(backend, shape.layout(), pool)
    loop = asyncio.new_event_loop()
    conn.send(("ready", None))
    while True:
        cmd, arg = conn.recv()
        if cmd == "stop":
            break
        outcomes = loop.run_until_complete(_send_all(sender, arg, shape.num_layers))
        conn.send(("done", outcomes))
    loop.run_until_complete(sender.close())


class SenderProcess:
    def __init__(
        self, backend: str, device: str, shape: PoolShape, seed: int, start_timeout_s: float = 300
    ) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(child_conn, backend, device, shape, seed), daemon=True)
        self.proc.start()
        self._expect("ready", start_timeout_s)

    def _expect(self, what: str, timeout_s: float) -> Any:
        if not self.conn.poll(timeout_s):
            raise TimeoutError(
                f"kv sender process: no {what!r} in {timeout_s}s (exit code {self.proc.exitcode})"
            )
        kind, payload = self.conn.recv()
        assert kind == what, f"kv sender process said {kind!r}, expected {what!r}"
        return payload

    async def run(self, transfers: list[Transfer], timeout_s: float = 300) -> list[Outcome]:
        """Send ``transfers`` concurrently; the caller's event loop keeps serving meanwhile."""
        self.conn.send(("run", transfers))
        return await asyncio.to_thread(self._expect, "done", timeout_s)

    def stop(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(("stop", None))
            self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
