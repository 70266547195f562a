"""Llama (incl. Llama 3.1 rope scaling); also the base of the Qwen2 and Qwen3 models.

Checkpoint names are HF's; ``packed_weights`` maps the separate q/k/v and gate/up tensors onto our
packed projections. The layers' elementwise work goes through the ``LayerOps`` the model is built
with (``engine.layers.kernels``: torch, or fused Triton kernels on CUDA).

The block runs in residual-stream form: a layer returns its MLP output and the running residual
separately, and the next layer's input norm adds them (``RMSNorm(x, residual)``), so every residual
add shares a kernel with the norm that follows it. The sums are the ones ``x = x + sublayer(norm(x))``
computes, rounded to the model dtype at the same points.

Tensor parallel: ``tp`` (an ``engine.distributed.TPGroup``; None: one rank) shards every
projection, the embedding and the LM head over the ranks (``engine.layers.linear``,
``engine.layers.embedding``); each rank's ``forward`` still returns the whole ``[batch, vocab]``
logits. Norms and rotary are replicated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, cast

import torch
from torch import nn

from engine.attention.base import ForwardBatch
from engine.config import ModelConfig
from engine.distributed import TPGroup
from engine.kvcache.page_pool import KVPagePool
from engine.layers.attention import AttentionOptions, SelfAttention
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.kernels import LayerOps
from engine.layers.mlp import GatedMLP
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.layers.stages import Stages, run_stages


class DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer_id: int,
        rotary: RotaryEmbedding,
        opts: AttentionOptions,
        ops: LayerOps,
        tp: TPGroup,
    ) -> None:
        super().__init__()
        self.self_attn = SelfAttention(cfg, layer_id, rotary, opts, ops, tp)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, ops, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.tp = tp

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output (the embedding for the first layer, whose residual is
        None). Returns (this layer's MLP output, the residual stream before it), both [T, hidden]."""
        return run_stages(self.stages(positions, x, residual, batch), self.tp.all_reduce)

    def stages(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch
    ) -> Stages[tuple[torch.Tensor, torch.Tensor]]:
        """``forward`` as stages (``engine.layers.stages``): yields the two partial sums to
        all-reduce (attention output, MLP output) and returns what ``forward`` returns."""
        q, k, v, residual = self.pre_attention(positions, x, residual, batch.kv_pool, batch.out_cache_loc)
        out = batch.attn_backend.forward(self.self_attn, q, k, v, batch)  # [T, local heads * head_dim]
        if batch.on_layer_done is not None:
            batch.on_layer_done(self.self_attn.layer_id)
        return (yield from self.post_attention_stages(out, residual))

    # The two halves around attention, for piecewise CUDA graphs (``engine.graphs.piecewise``).
    def pre_attention(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv_pool: KVPagePool,
        slots: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input norm (+ residual add) and q/k/v, K/V stored at ``slots``: returns q, k, v
        (``SelfAttention.qkv``) and the residual stream [T, hidden]."""
        return self.self_attn.qkv(positions, x, residual, self.input_layernorm, kv_pool, slots)

    def post_attention(
        self, attn_out: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """attn_out [T, local heads * head_dim] -> (MLP output, residual stream), both [T, hidden]."""
        return run_stages(self.post_attention_stages(attn_out, residual), self.tp.all_reduce)

    def post_attention_stages(
        self, attn_out: torch.Tensor, residual: torch.Tensor
    ) -> Stages[tuple[torch.Tensor, torch.Tensor]]:
        attn_sum = yield self.self_attn.o_proj(attn_out, reduce=False)  # [T, hidden]
        mlp_out, residual = self.mlp(attn_sum, residual, self.post_attention_layernorm, reduce=False)
        mlp_sum = yield mlp_out  # [T, hidden]
        return mlp_sum, residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, opts: AttentionOptions, ops: LayerOps, tp: TPGroup) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, rotary, opts, ops, tp) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.tp = tp

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)  # [num_tokens, hidden]
        return run_stages(self.layer_stages(x, batch), self.tp.all_reduce)  # [num_tokens, hidden]

    def layer_stages(self, x: torch.Tensor, batch: ForwardBatch) -> Stages[torch.Tensor]:
        """Every layer and the final norm as stages over the embedded ``x`` [T, hidden] of
        ``batch`` (a micro-batch, in two-batch overlap); returns the normed hidden states."""
        residual: torch.Tensor | None = None
        for layer in self.layers:
            x, residual = yield from cast(DecoderLayer, layer).stages(batch.positions, x, residual, batch)
        assert residual is not None, "a model has at least one layer"
        return self.norm(x, residual)[0]  # [T, hidden]


class LlamaForCausalLM(nn.Module):
    qk_norm = False
    # None: config.json's attention_bias decides (HF Llama / Qwen3 use it for q/k/v and o).
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    # checkpoint module name -> (our packed module, part)
    packed_weights: ClassVar[dict[str, tuple[str, str]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, cfg: ModelConfig, ops: LayerOps | None = None, tp: TPGroup | None = None) -> None:
        """``ops``: the layers' elementwise implementation; None is the torch one (CPU, reference).
        ``tp``: this rank's tensor-parallel group; None is one rank. A shape that cannot be split
        over ``tp.world_size`` ranks is a ValueError naming the config field."""
        super().__init__()
        self.config = cfg
        ops = LayerOps() if ops is None else ops
        self.tp = TPGroup() if tp is None else tp
        cfg.tp_heads(self.tp.world_size)  # a head split that does not divide fails before any allocation
        opts = AttentionOptions(
            qk_norm=self.qk_norm,
            qkv_bias=cfg.attention_bias if self.qkv_bias is None else self.qkv_bias,
            o_bias=cfg.attention_bias if self.o_bias is None else self.o_bias,
        )
        self.model = DecoderModel(cfg, opts, ops, self.tp)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, self.tp, ops)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # type: ignore[assignment]

    def forward(self, batch: ForwardBatch, out: torch.Tensor | None = None) -> torch.Tensor:
        """Returns float32 logits of each sequence's last new token: [batch, vocab] (``out``: written
        into that float32 buffer, converted as they are copied, and returned)."""
        hidden = self.model(batch)
        return self._logits(hidden[batch.logits_indices], out)

    def _logits(self, last_hidden: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        logits = self.lm_head(last_hidden)  # [batch, vocab] in the model dtype
        return logits.float() if out is None else out.copy_(logits)

    def forward_two_batch(
        self,
        batch: ForwardBatch,
        halves: tuple[ForwardBatch, ForwardBatch],
        run: Callable[[tuple[Stages[torch.Tensor], Stages[torch.Tensor]]], list[torch.Tensor]],
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``forward`` with the layers run as two micro-batches (``halves``: rows ``[0, n0)`` and
        ``[n0, n)`` of a decode ``batch``) whose stages ``run`` interleaves
        (``engine.graphs.two_batch``); embedding and LM head see the whole batch."""
        x = self.model.embed_tokens(batch.input_ids)  # [bs, hidden]
        parts = x.split([h.num_tokens for h in halves])
        stages = (self.model.layer_stages(parts[0], halves[0]), self.model.layer_stages(parts[1], halves[1]))
        hidden = torch.cat(run(stages))  # [bs, hidden]
        return self._logits(hidden[batch.logits_indices], out)
