"""The ``triton`` attention backend: Triton paged decode; extend stays on torch_native until #6.

Decode metadata is one launch constant, the KV split count. Eager steps choose it from the batch
size and the batch's longest sequence (known on the host, no sync); a CUDA graph chooses it once per
captured batch size from the context limit, which is valid for every replay because the kernel
derives each split's range from ``seq_lens`` on the device. Both launch the same kernel through
``decode`` with the same ``DecodeMetadata``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention.base import ForwardBatch, ForwardMode
from engine.attention.torch_native import TorchNativeBackend
from engine.attention.triton_decode import num_splits_for, paged_decode_attention


@dataclass(frozen=True)
class DecodeMetadata:
    num_splits: int  # KV splits per (sequence, KV head): a power of two, a launch constant


class TritonBackend(TorchNativeBackend):
    supports_graphs = True

    def __init__(self, max_gather_tokens: int, device: torch.device) -> None:
        super().__init__(max_gather_tokens)
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count

    def prepare(self, batch: ForwardBatch) -> None:
        if batch.mode is ForwardMode.DECODE:
            batch.attn_metadata = self._decode_metadata(batch, max(batch.seq_lens_cpu))

    def prepare_graph(self, batch: ForwardBatch, max_seq_len: int) -> None:
        assert batch.mode is ForwardMode.DECODE, "only decode batches are captured"
        batch.attn_metadata = self._decode_metadata(batch, max_seq_len)

    def _decode_metadata(self, batch: ForwardBatch, max_seq_len: int) -> DecodeMetadata:
        num_kv_heads = batch.kv_pool.num_kv_heads
        return DecodeMetadata(num_splits_for(batch.batch_size, num_kv_heads, self.num_sms, max_seq_len))

    def decode(self, q, k_pages, v_pages, batch: ForwardBatch, scale: float) -> torch.Tensor:
        meta: DecodeMetadata = batch.attn_metadata
        return paged_decode_attention(
            q, k_pages, v_pages, batch.page_table, batch.seq_lens, scale, num_splits=meta.num_splits
        )
