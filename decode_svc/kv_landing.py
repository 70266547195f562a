"""Where received KV pages land before the engine may read them.

One rank: the receiver writes straight into the engine's pool (the pages are reserved, so no step
touches them), and landing is nothing.

Tensor parallelism: the receiver runs in rank 0's process and gets whole kv heads, but each rank's
pool holds only its own heads. So the receiver writes into a host staging buffer per request
(``StagingPool``, keyed by the reserved page ids) and, once the transfer is DONE, ``land`` moves the
pages into every rank's pool with ``Engine.write_kv`` on the step thread, between two steps. The
request is handed to the engine (``adopt``) only after that, so no step reads a page that some rank
lacks: the import plan precedes, on every rank's plan stream, the first step that reads the pages.
"""

from __future__ import annotations

import functools

import torch

from engine.async_engine import AsyncEngine
from engine.distributed.kv_shards import layer_ranges
from engine.engine import Engine


class StagingPool:
    """What a KV receiver writes into when the engine's pool is sharded: per request, a host buffer
    ``[layers, 2, pages, page_size, num_kv_heads, head_dim]`` of whole heads. It offers the part of
    ``KVPagePool`` receivers use: ``kv_gpu`` (for its device and dtype only) and ``write_pages``."""

    def __init__(self, num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        self.num_layers, self.page_size = num_layers, page_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.kv_gpu = torch.empty(0, dtype=dtype)  # receivers place chunks on its device: host
        self._buffers: dict[int, tuple[torch.Tensor, int]] = {}  # page id → (buffer, index in it)

    def open(self, page_ids: list[int]) -> None:
        """Make room for a transfer into ``page_ids`` (reserved, so not staged by another)."""
        shape = (self.num_layers, 2, len(page_ids), self.page_size, self.num_kv_heads, self.head_dim)
        buffer = torch.zeros(shape, dtype=self.kv_gpu.dtype)
        for i, page in enumerate(page_ids):
            assert page not in self._buffers, f"page {page} is staged twice"
            self._buffers[page] = (buffer, i)

    def write_pages(self, layer: int, pages: torch.Tensor, kv: torch.Tensor) -> None:
        """``kv`` [2, len(pages), page_size, num_kv_heads, head_dim] into the staged ``pages``."""
        staged = [self._buffers[p] for p in pages.tolist()]
        buffer = staged[0][0]
        assert all(b is buffer for b, _ in staged), "a chunk spans pages of one transfer"
        index = torch.tensor([i for _, i in staged], dtype=torch.int64)
        buffer[layer].index_copy_(1, index, kv)

    def take(self, page_ids: list[int]) -> torch.Tensor:
        """The staged buffer of ``page_ids`` (as opened); they are no longer staged."""
        buffer, first = self._buffers[page_ids[0]]
        assert first == 0 and buffer.shape[2] == len(page_ids), "take what was opened"
        self.drop(page_ids)
        return buffer

    def drop(self, page_ids: list[int]) -> None:
        for page in page_ids:
            self._buffers.pop(page, None)


class KVLanding:
    """The receiver's ``pool`` and the step from "received" to "readable by every rank"."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        e = engine.engine
        m = e.model_config
        self.staging: StagingPool | None = None
        if e.workers is not None:
            self.staging = StagingPool(
                m.num_layers, e.cfg.page_size, m.num_kv_heads, m.head_dim, m.torch_dtype
            )
        self.pool = self.staging if self.staging is not None else e.runner.kv_pool

    def open(self, page_ids: list[int]) -> None:
        if self.staging is not None:
            self.staging.open(page_ids)

    async def land(self, page_ids: list[int]) -> None:
        """After the transfer into ``page_ids`` is DONE: make the pages readable by every rank.
        Raises RuntimeError if a rank died (the engine cannot serve any more)."""
        if self.staging is None:
            return
        kv = self.staging.take(page_ids)
        e = self.engine.engine
        for layers in layer_ranges(e.model_config, e.cfg.page_size, len(page_ids)):
            write = functools.partial(
                Engine.write_kv, pages=page_ids, layers=layers, kv=kv[layers.start : layers.stop]
            )
            await self.engine.call_on_ranks(write)

    def close(self, page_ids: list[int]) -> None:
        """The transfer ended without landing (failed, aborted, cancelled): forget its staging. Call
        after ``receiver.abort``, which guarantees nothing writes these pages any more."""
        if self.staging is not None:
            self.staging.drop(page_ids)
