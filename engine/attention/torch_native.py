"""Attention in plain torch (SDPA) over the paged pool: the CPU path and the GPU kernels' reference.

Decode gathers sequences' pages into a padded ``[rows, max_pages * page_size]`` view and masks
positions past ``seq_len``, in groups of rows whose padded gather holds at most
``max_gather_tokens`` tokens (the step token budget, so decode never needs more transient memory
than the prefill step the KV pool was sized against). Extend loops over sequences (prompt lengths
differ a lot, padding would waste more than the loop costs) with a causal mask offset by the
cached prefix.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, ForwardBatch, ForwardMode


class TorchNativeBackend(AttentionBackend):
    def __init__(self, max_gather_tokens: int) -> None:
        self.max_gather_tokens = max_gather_tokens

    def forward(
        self, layer: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        # q [num_tokens, num_heads, head_dim]; k, v [num_tokens, num_kv_heads, head_dim]
        pool = batch.kv_pool
        k_pages, v_pages = pool.k_pages(layer.layer_id), pool.v_pages(layer.layer_id)
        if batch.mode is ForwardMode.DECODE:
            out = self.decode(q, k_pages, v_pages, batch, layer.scaling)
        else:
            out = self._extend(q, k_pages, v_pages, batch, layer.scaling)
        return out.reshape(q.shape[0], -1)

    def decode(self, q, k_pages, v_pages, batch: ForwardBatch, scale: float) -> torch.Tensor:
        """Decode attention over the pool (new K/V already stored): [batch, num_heads, head_dim]."""
        page_size = k_pages.shape[1]
        bs = batch.batch_size
        max_len = -(-max(batch.seq_lens_cpu) // page_size) * page_size
        rows = max(1, self.max_gather_tokens // max_len)
        outs = []
        for lo in range(0, bs, rows):
            hi = min(lo + rows, bs)
            num_pages = -(-max(batch.seq_lens_cpu[lo:hi]) // page_size)
            table = batch.page_table[lo:hi, :num_pages]
            outs.append(paged_decode(q[lo:hi], k_pages, v_pages, table, batch.seq_lens[lo:hi], scale))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @staticmethod
    def _extend(q, k_pages, v_pages, batch: ForwardBatch, scale: float) -> torch.Tensor:
        _, page_size, num_kv_heads, head_dim = k_pages.shape
        outs = []
        start = 0
        for i, (seq_len, ext) in enumerate(zip(batch.seq_lens_cpu, batch.extend_lens_cpu, strict=True)):
            pages = batch.page_table[i, : -(-seq_len // page_size)]
            k = k_pages[pages].view(-1, num_kv_heads, head_dim)[:seq_len].transpose(0, 1)
            v = v_pages[pages].view(-1, num_kv_heads, head_dim)[:seq_len].transpose(0, 1)
            qi = q[start : start + ext].transpose(0, 1)  # [num_heads, ext, head_dim]
            # Expand K/V heads for GQA and pass 4-D tensors: SDPA's fused (flash / mem-efficient)
            # kernels accept nothing else and would fall back to materialising [heads, ext, seq_len].
            groups = qi.shape[0] // num_kv_heads
            k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
            prefix = seq_len - ext
            if prefix == 0:
                o = F.scaled_dot_product_attention(qi[None], k[None], v[None], is_causal=True, scale=scale)
            else:
                # query t (absolute position prefix + t) sees keys 0..prefix + t
                key_pos = torch.arange(seq_len, device=q.device)
                query_pos = torch.arange(prefix, seq_len, device=q.device)
                mask = key_pos[None, :] <= query_pos[:, None]  # [ext, seq_len]
                o = F.scaled_dot_product_attention(qi[None], k[None], v[None], attn_mask=mask, scale=scale)
            o = o[0]
            outs.append(o.transpose(0, 1))  # [ext, num_heads, head_dim]
            start += ext
        return torch.cat(outs, dim=0)


def paged_decode(
    q: torch.Tensor,  # [rows, num_heads, head_dim]
    k_pages: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_pages: torch.Tensor,
    table: torch.Tensor,  # [rows, width] page ids; entries past a row's pages: any page
    seq_lens: torch.Tensor,  # [rows] KV lengths, at most width * page_size
    scale: float,
) -> torch.Tensor:
    """One decode query per row over its ``seq_lens`` keys, gathered through ``table``:
    [rows, num_heads, head_dim]."""
    rows, width = table.shape
    _, page_size, num_kv_heads, head_dim = k_pages.shape
    length = width * page_size
    valid = torch.arange(length, device=q.device)[None, :] < seq_lens[:, None]  # [rows, length]
    # The gather is a copy: zero its positions past each row's length in place. A padded row reads
    # the dummy page 0, which padded writes fill with anything (even NaN), and a masked NaN still
    # poisons SDPA (-inf + NaN scores; 0 * NaN values).
    hide, shape = ~valid[:, :, None, None], (rows, length, num_kv_heads, head_dim)
    k = k_pages[table].view(shape).masked_fill_(hide, 0).transpose(1, 2)
    v = v_pages[table].view(shape).masked_fill_(hide, 0).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=True
    )  # [rows, num_heads, 1, head_dim]
    return out.squeeze(2)
