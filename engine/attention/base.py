"""The attention-backend contract and the per-step batch description every backend reads.

A batch is *packed*: the new tokens of all sequences are concatenated into one ``[num_tokens, ...]``
tensor. In an EXTEND batch each sequence brings ``extend_len >= 1`` new tokens on top of a cached
prefix (``prefix_len = seq_len - extend_len`` tokens already in the page pool, from a prefix-cache
hit or an earlier chunk). In a DECODE batch every sequence brings exactly one token.

Backend contract (``AttentionBackend``):
- ``prepare(batch)`` runs once per step, before the forward, and may attach backend-specific
  metadata to ``batch.attn_metadata`` (index tensors, split counts). It must not sync with the GPU.
- ``forward(layer, q, k, v, batch)`` attends each query over its sequence's whole KV (prefix +
  new), causally, and returns ``[num_tokens, num_heads * head_dim]``. The new tokens' K/V are
  already in the pool at ``batch.out_cache_loc`` (the layer stores them as it applies rotary,
  ``LayerOps.qk_norm_rope_store``) and are also passed in as ``k``, ``v``.
- CUDA graphs (``engine.graphs``): a backend with ``supports_graphs`` implements
  ``prepare_graph(batch, max_seq_len)``, called once per captured DECODE batch size instead of
  ``prepare``. The batch's tensors are static buffers that later replays refill with other
  sequences, so the metadata it attaches is baked into the graph: it must hold for every replay
  with ``seq_lens <= max_seq_len``, depend on the batch size and on device tensors only (never on
  ``*_cpu`` fields), and allocate nothing a replay would have to refresh. Rows past the live batch
  are padding (``seq_len`` 1 on page 0) and must stay harmless.
- Context parallelism (``engine.distributed.context_parallel``): a split step's batch is one rank's
  share. Its queries are chunks of sequences, each described to the backend as a sequence of its
  own (``seq_lens``: the chunk's end position, ``extend_lens``: its size, the sequence's page-table
  row), so "causal over the prefix" is causal by absolute position; ``cp`` says how the ranks' K/V
  are gathered into the pool before the backend attends.
Backends are registered by name in ``engine.attention`` and chosen once at startup.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engine.kvcache.page_pool import KVPagePool


@dataclass(frozen=True)
class CPExchange:
    """A context-parallel split step's K/V exchange: each rank sends ``rows_per_rank`` rows (its
    own, padded), and row j of the gathered ``[cp * rows_per_rank, ...]`` K/V belongs in pool slot
    ``gather_slots[j]`` (padding: slot 0, the dummy page)."""

    rows_per_rank: int
    gather_slots: torch.Tensor  # [cp * rows_per_rank] int64


class ForwardMode(enum.Enum):
    EXTEND = "extend"
    DECODE = "decode"


@dataclass
class ForwardBatch:
    mode: ForwardMode
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    out_cache_loc: torch.Tensor  # [num_tokens] int64 slot of each new token's K/V
    page_table: torch.Tensor  # [batch, max_pages] int64; entries past a row's last page: any page id
    seq_lens: torch.Tensor  # [batch] int64 KV length after this step
    logits_indices: torch.Tensor  # [batch] int64 row of each sequence's last new token
    seq_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    kv_pool: KVPagePool
    attn_backend: AttentionBackend
    attn_metadata: Any = None
    cp: CPExchange | None = None  # set on a context-parallel split step only
    # Called with each layer's id right after its attention, in layer order (the layer's new K/V
    # are in the pool then); eager code only, never inside a graph. ``engine.kv_stream``.
    on_layer_done: Callable[[int], None] | None = None

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]


class AttentionBackend:
    """Base class; see the module docstring for the contract."""

    supports_graphs: bool = False  # a class constant, but a wrapper may take its inner backend's

    def prepare(self, batch: ForwardBatch) -> None:
        pass

    def prepare_graph(self, batch: ForwardBatch, max_seq_len: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot run inside a CUDA graph")

    def warm_up(
        self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, max_tokens: int,
        device: torch.device,
    ) -> int:  # fmt: skip
        """Build, for the calling thread, what the first steps of some shapes would otherwise build
        in front of a request (attention of ``num_heads`` / ``num_kv_heads`` heads of ``head_dim``,
        scale ``head_dim ** -0.5``, in steps of up to ``max_tokens`` tokens); returns how many things
        were built (for the log). Nothing by default."""
        return 0

    def forward(
        self, layer: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        raise NotImplementedError
