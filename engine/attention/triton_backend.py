"""The ``triton`` attention backend: Triton paged decode; extend stays on torch_native until #6."""

from __future__ import annotations

import torch

from engine.attention.base import ForwardBatch, ForwardMode
from engine.attention.torch_native import TorchNativeBackend
from engine.attention.triton_decode import num_splits_for, paged_decode_attention


class TritonBackend(TorchNativeBackend):
    def __init__(self, max_gather_tokens: int, device: torch.device) -> None:
        super().__init__(max_gather_tokens)
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count

    def prepare(self, batch: ForwardBatch) -> None:
        if batch.mode is ForwardMode.DECODE:
            num_kv_heads = batch.kv_pool.num_kv_heads
            batch.attn_metadata = num_splits_for(batch.batch_size, num_kv_heads, self.num_sms)

    def decode(self, q, k_pages, v_pages, batch: ForwardBatch, scale: float) -> torch.Tensor:
        return paged_decode_attention(
            q, k_pages, v_pages, batch.page_table, batch.seq_lens, scale, num_splits=batch.attn_metadata
        )
