"""Piecewise CUDA graphs for EXTEND batches: the forward cut at attention, one graph per piece and
token-count bucket, attention eager in between.

A short prefill (tens to hundreds of tokens) is launch-bound like decode, but its attention needs
per-batch metadata (where sequences start, how long their cached prefixes are) that a graph cannot
bake in. So the forward is cut around attention (``DecoderLayer.pre_attention`` / ``post_attention``):

- piece 0: the embedding and layer 0 up to q/k/v;
- piece i (1 <= i < L): layer i-1 after attention (o_proj, norm, MLP) and layer i up to q/k/v;
- piece L: layer L-1 after attention and the final norm.

Each piece that ends at q/k/v also stores the new K/V into the pool (``pre_attention``; padded rows
write to slot 0, the never-allocated dummy page). Between pieces the attention backend runs eagerly
with the batch's metadata, on the live tokens only (``AttentionBackend.forward``). The logits of
each sequence's last token are taken eagerly after the last piece, as the eager forward does.

Buffers. Pieces pass tensors through static buffers sized for the largest bucket: ``input_ids``,
``positions``, ``out_cache_loc`` (the batch's inputs), ``q``/``k``/``v`` and ``residual`` (a piece's outputs),
``attn_out`` (the next piece's input), ``hidden`` (the last piece's output). A batch of n tokens runs
in the smallest bucket T >= n: rows n..T-1 compute on stale values that nothing reads, since every
op inside a piece works row by row and attention sees only the n live rows; their KV slots are reset
to 0 at staging, so their stores land on the dummy page.

Capture. Buckets largest first, each bucket's pieces in order, all into one memory pool; what a
piece allocates inside is released once it is captured, so the pool holds about one piece of the
largest bucket. Buckets: steps of 16 tokens up to 64, then four per doubling (<= 25 % padding), up
to ``max_tokens`` (the chunked-prefill chunk, so full chunks run unpadded).

Why explicit capture rather than torch.compile with a graph split at a registered attention op: no
compile step at startup (minutes for an 8B model, cached fragilely across versions), the same eager
modules and fused Triton kernels run in and out of graphs, and the cut points are plain methods of
the model. A collective inside a piece (tensor parallelism) must use buffers that exist before
capture; nothing here allocates during a replay.
"""

from __future__ import annotations

import bisect
import logging
from typing import Any

import torch

from engine.attention.base import AttentionBackend, ForwardBatch, ForwardMode
from engine.graphs.capture import capture_all
from engine.kvcache.page_pool import KVPagePool
from engine.models.llama import DecoderLayer, LlamaForCausalLM

log = logging.getLogger(__name__)


def piecewise_buckets(max_tokens: int) -> list[int]:
    """Token counts captured: 16, 32, 48, 64, then four per doubling (80, 96, 112, 128, 160, ...),
    and ``max_tokens`` itself."""
    assert max_tokens >= 1, f"max_tokens must be >= 1, got {max_tokens}"
    sizes, size = [], 16
    while size < max_tokens:
        sizes.append(size)
        size += max(16, (1 << (size.bit_length() - 1)) >> 2)
    return [*sizes, max_tokens]


class PiecewiseGraphRunner:
    """Piecewise graphs for EXTEND batches of up to ``max_tokens`` tokens (module docstring).

    ``capture()`` once, after the KV pool exists. Per step: ``stage(fb)`` copies an eager EXTEND
    batch's inputs into the static buffers (device to device, no sync); ``replay(fb)`` runs the
    pieces with attention in between and returns ``[batch, vocab]`` float32 logits.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_pool: KVPagePool,
        attn_backend: AttentionBackend,
        *,
        max_tokens: int,
        device: torch.device,
    ) -> None:
        self.model, self.kv_pool, self.attn_backend, self.device = model, kv_pool, attn_backend, device
        decoder = model.model
        self.embed, self.norm = decoder.embed_tokens, decoder.norm
        self.layers: list[DecoderLayer] = list(decoder.layers)  # type: ignore[arg-type]
        self.buckets = piecewise_buckets(max_tokens)
        cfg, t = model.config, self.buckets[-1]
        dtype = self.embed.weight.dtype

        def buffer(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.input_ids = buffer(t, dtype=torch.int64)  # [T]
        self.positions = buffer(t, dtype=torch.int64)  # [T]
        self.out_cache_loc = buffer(t, dtype=torch.int64)  # [T] KV slot per token; 0 (dummy) when padded
        attn = self.layers[0].self_attn  # this rank's head counts (tensor parallel: a share)
        self.q = buffer(t, attn.num_heads, cfg.head_dim)  # [T, num_heads, head_dim]
        self.k = buffer(t, attn.num_kv_heads, cfg.head_dim)  # [T, num_kv_heads, head_dim]
        self.v = buffer(t, attn.num_kv_heads, cfg.head_dim)
        self.residual = buffer(t, cfg.hidden_size)  # [T, hidden]
        self.attn_out = buffer(t, attn.num_heads * cfg.head_dim)  # [T, num_heads * head_dim]
        self.hidden = buffer(t, cfg.hidden_size)  # [T, hidden]
        buffers = [
            self.input_ids,
            self.positions,
            self.out_cache_loc,
            self.q,
            self.k,
            self.v,
            self.residual,
            self.attn_out,
        ]
        self.static_bytes = sum(b.nbytes for b in [*buffers, self.hidden])
        self._graphs: dict[int, list[Any]] = {}  # bucket -> one torch.cuda.CUDAGraph per piece
        self._staged: ForwardBatch | None = None
        self.capture_seconds, self.graph_memory_bytes = 0.0, 0

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    @property
    def num_pieces(self) -> int:
        return len(self.layers) + 1

    def bucket(self, num_tokens: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, num_tokens)]

    # -- the step ------------------------------------------------------------------------------------
    def stage(self, fb: ForwardBatch) -> None:
        """Copy an EXTEND batch of at most ``max_tokens`` tokens into the static inputs."""
        assert fb.mode is ForwardMode.EXTEND and fb.num_tokens <= self.max_tokens, "not a piecewise batch"
        n = fb.num_tokens
        self.input_ids[:n].copy_(fb.input_ids)
        self.positions[:n].copy_(fb.positions)
        self.out_cache_loc[:n].copy_(fb.out_cache_loc)
        self.out_cache_loc[n : self.bucket(n)].zero_()
        self._staged = fb

    def is_staged(self, fb: ForwardBatch) -> bool:
        return fb is self._staged

    def replay(self, fb: ForwardBatch) -> torch.Tensor:
        assert fb is self._staged, "replay() runs the batch of the latest stage()"
        n = fb.num_tokens
        pieces = self._graphs[self.bucket(n)]
        self.attn_backend.prepare(fb)
        for layer, piece in zip(self.layers, pieces, strict=False):
            piece.replay()
            out = self.attn_backend.forward(layer.self_attn, self.q[:n], self.k[:n], self.v[:n], fb)
            self.attn_out[:n].copy_(out)  # [n, num_heads * head_dim]
            if fb.on_layer_done is not None:
                fb.on_layer_done(layer.self_attn.layer_id)
        pieces[-1].replay()
        return self.model.lm_head(self.hidden[:n][fb.logits_indices]).float()  # [batch, vocab]

    def run_piece(self, i: int, t: int) -> None:
        """What piece ``i`` of bucket ``t`` holds, on the first ``t`` rows of the static buffers."""
        if i == 0:
            x, residual = self.embed(self.input_ids[:t]), None
        else:
            x, residual = self.layers[i - 1].post_attention(self.attn_out[:t], self.residual[:t])
        if i == len(self.layers):
            self.hidden[:t].copy_(self.norm(x, residual)[0])
            return
        q, k, v, residual = self.layers[i].pre_attention(
            self.positions[:t], x, residual, self.kv_pool, self.out_cache_loc[:t]
        )
        self.q[:t].copy_(q)
        self.k[:t].copy_(k)
        self.v[:t].copy_(v)
        self.residual[:t].copy_(residual)

    # -- capture -------------------------------------------------------------------------------------
    def capture(self) -> None:
        """Capture every bucket's pieces, largest bucket first, into one pool; logs time and memory."""

        def capture(pool: Any, stream: torch.cuda.Stream) -> None:
            for t in reversed(self.buckets):
                for i in range(self.num_pieces):
                    self.run_piece(i, t)  # warm-up: Triton variants for this shape, cuBLAS setup
                torch.cuda.synchronize(self.device)
                self._graphs[t] = [self._capture(i, t, pool, stream) for i in range(self.num_pieces)]

        self.capture_seconds, self.graph_memory_bytes = capture_all(self.device, capture)
        log.info(
            "piecewise CUDA graphs: %d token buckets (16..%d) x %d pieces captured in %.2f s; graph pool "
            "%.1f MiB, static buffers %.1f MiB",
            len(self.buckets),
            self.max_tokens,
            self.num_pieces,
            self.capture_seconds,
            self.graph_memory_bytes / 2**20,
            self.static_bytes / 2**20,
        )

    def _capture(self, i: int, t: int, pool: Any, stream: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            self.run_piece(i, t)
        return graph
