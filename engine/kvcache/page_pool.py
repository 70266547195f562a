"""The KV page pool: one tensor holding every layer's K and V pages.

Layout ``[num_layers, 2 (k, v), num_pages, page_size, num_kv_heads, head_dim]``: a layer's K (or V)
pages are one contiguous block, so layer-by-layer KV transfer and per-layer kernels index pages
directly. A token's *slot* is ``page * page_size + offset``; ``store`` writes new tokens by slot.
Page 0 is never allocated (see ``PageAllocator``) so padded rows can write there harmlessly.
"""

from __future__ import annotations

import torch


class KVPagePool:
    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_layers, self.num_pages, self.page_size = num_layers, num_pages, page_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        # [num_layers, 2, num_pages, page_size, num_kv_heads, head_dim]
        self.kv_gpu = torch.zeros(
            num_layers, 2, num_pages, page_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )

    @staticmethod
    def bytes_per_page(
        num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return num_layers * 2 * page_size * num_kv_heads * head_dim * dtype.itemsize

    def k_pages(self, layer: int) -> torch.Tensor:
        return self.kv_gpu[layer, 0]  # [num_pages, page_size, num_kv_heads, head_dim]

    def v_pages(self, layer: int) -> torch.Tensor:
        return self.kv_gpu[layer, 1]  # [num_pages, page_size, num_kv_heads, head_dim]

    def slot_views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's K and V pages indexed by slot: two ``[num_pages * page_size, num_kv_heads,
        head_dim]`` views."""
        shape = (-1, self.num_kv_heads, self.head_dim)
        return self.k_pages(layer).view(shape), self.v_pages(layer).view(shape)

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # slots [num_tokens]; k, v [num_tokens, num_kv_heads, head_dim]
        k_cache, v_cache = self.slot_views(layer)
        k_cache.index_copy_(0, slots, k)
        v_cache.index_copy_(0, slots, v)

    def read_pages(self, layer: int, pages: torch.Tensor) -> torch.Tensor:
        """One layer's K and V of ``pages``: [2, num_pages, page_size, num_kv_heads, head_dim] (a copy)."""
        return self.kv_gpu[layer].index_select(1, pages)

    def write_pages(self, layer: int, pages: torch.Tensor, kv: torch.Tensor) -> None:
        """Overwrite one layer's K and V of ``pages`` with ``kv`` as returned by ``read_pages``."""
        self.kv_gpu[layer].index_copy_(1, pages, kv)
