"""The ``triton`` attention backend: Triton paged decode, FlashAttention-2 varlen extend.

Decode metadata is one launch constant, the KV split count. Eager steps choose it from the batch
size and the batch's longest sequence (known on the host, no sync); a CUDA graph chooses it once per
captured batch size from the context limit, which is valid for every replay because the kernel
derives each split's range from ``seq_lens`` on the device. Both launch the same kernel through
``decode`` with the same ``DecodeMetadata``.

Extend runs the whole packed batch through ``varlen_extend`` (``ExtendMetadata``: cumulative lengths
and, for sequences with a cached prefix, the pool slots of their keys, built once per step). Where
FA2 cannot run (``torch.nn.attention.varlen`` missing, or a float32 model) extend stays on
torch_native's per-sequence loop; which path is used is logged once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from engine.attention.base import ForwardBatch, ForwardMode
from engine.attention.torch_native import TorchNativeBackend
from engine.attention.triton_decode import num_splits_for, paged_decode_attention
from engine.attention.varlen_extend import (
    ExtendMetadata,
    build_extend_metadata,
    paged_extend_attention,
    varlen_supported,
    warm_dense_plans,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeMetadata:
    num_splits: int  # KV splits per (sequence, KV head): a power of two, a launch constant


class TritonBackend(TorchNativeBackend):
    supports_graphs = True

    def __init__(self, max_gather_tokens: int, device: torch.device) -> None:
        super().__init__(max_gather_tokens)
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self._extend_path_logged = False

    def prepare(self, batch: ForwardBatch) -> None:
        if batch.mode is ForwardMode.DECODE:
            batch.attn_metadata = self._decode_metadata(batch, max(batch.seq_lens_cpu))
        elif self._use_varlen(batch.kv_pool.kv_gpu.dtype):
            batch.attn_metadata = build_extend_metadata(
                batch.seq_lens_cpu,
                batch.extend_lens_cpu,
                batch.page_table,
                batch.kv_pool.page_size,
                self.max_gather_tokens,
            )

    def prepare_graph(self, batch: ForwardBatch, max_seq_len: int) -> None:
        assert batch.mode is ForwardMode.DECODE, "only decode batches are captured"
        batch.attn_metadata = self._decode_metadata(batch, max_seq_len)

    def forward(
        self, layer: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        # q [num_tokens, num_heads, head_dim]; k, v [num_tokens, num_kv_heads, head_dim]
        meta = batch.attn_metadata
        if not isinstance(meta, ExtendMetadata):  # decode, or extend on the torch_native loop
            return super().forward(layer, q, k, v, batch)
        pool = batch.kv_pool
        k_pages, v_pages = pool.k_pages(layer.layer_id), pool.v_pages(layer.layer_id)
        out = paged_extend_attention(q, k, v, k_pages, v_pages, meta, layer.scaling)
        return out.reshape(q.shape[0], -1)  # [num_tokens, num_heads * head_dim]

    def warm_up(
        self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, max_tokens: int,
        device: torch.device,
    ) -> int:  # fmt: skip
        """cuDNN's plans for the dense path of lone long prompts (``varlen_extend.SDPA_MIN_TOKENS``)."""
        if not self._use_varlen(dtype):
            return 0
        return warm_dense_plans(num_heads, num_kv_heads, head_dim, dtype, max_tokens, head_dim**-0.5, device)

    def _use_varlen(self, dtype: torch.dtype) -> bool:
        use = varlen_supported(dtype)
        if not self._extend_path_logged:
            self._extend_path_logged = True
            if use:
                why = ""
            elif varlen_supported(torch.bfloat16):
                why = f": FA2 runs fp16/bf16 only, the KV cache is {dtype}"
            else:
                why = ": this torch build has no FlashAttention-2 varlen op"
            path = "FlashAttention-2 varlen" if use else "torch_native's per-sequence loop"
            log.info("triton attention backend: extend through %s%s", path, why)
        return use

    def _decode_metadata(self, batch: ForwardBatch, max_seq_len: int) -> DecodeMetadata:
        num_kv_heads = batch.kv_pool.num_kv_heads
        return DecodeMetadata(num_splits_for(batch.batch_size, num_kv_heads, self.num_sms, max_seq_len))

    def decode(self, q, k_pages, v_pages, batch: ForwardBatch, scale: float) -> torch.Tensor:
        meta: DecodeMetadata = batch.attn_metadata
        return paged_decode_attention(
            q, k_pages, v_pages, batch.page_table, batch.seq_lens, scale, num_splits=meta.num_splits
        )
