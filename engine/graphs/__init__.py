"""CUDA graph runners, chosen once at startup: decode graphs and piecewise extend graphs.

``create_decode_graphs`` returns a captured ``DecodeGraphRunner``, or None (the engine stays eager)
unless the config asks for graphs (``cuda_graphs``, the default), the device is CUDA and the
attention backend can run inside a graph (``AttentionBackend.supports_graphs``: ``triton`` can;
``torch_native`` cannot, its decode sizes its gathers from host-side sequence lengths).
``create_piecewise_graphs`` returns a captured ``PiecewiseGraphRunner`` for EXTEND batches of up to
``EngineConfig.piecewise_token_limit`` tokens (by model size), or None, under the same switch on
CUDA (attention runs eagerly between the pieces, so any backend works); ``ModelRunner.prepare``
decides per step whether the pieces pay.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine.attention.base import AttentionBackend
from engine.config import EngineConfig
from engine.graphs.decode_graphs import DecodeGraphRunner, graph_batch_sizes, resolve_input_ids
from engine.graphs.piecewise import PiecewiseGraphRunner, piecewise_buckets
from engine.kvcache.page_pool import KVPagePool
from engine.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)


def create_decode_graphs(
    cfg: EngineConfig,
    model: nn.Module,
    kv_pool: KVPagePool,
    attn_backend: AttentionBackend,
    last_tokens: torch.Tensor,
    max_model_len: int,
    vocab_size: int,
) -> DecodeGraphRunner | None:
    if not cfg.cuda_graphs:
        return None
    device = torch.device(cfg.device)
    if device.type != "cuda" or not attn_backend.supports_graphs:
        log.info(
            "cuda_graphs: ignored on %s with the %r attention backend (graphs need CUDA and a "
            "backend that supports them, e.g. 'triton'); decode runs eagerly",
            device,
            cfg.attention_backend,
        )
        return None
    runner = DecodeGraphRunner(
        model,
        kv_pool,
        attn_backend,
        last_tokens,
        max_batch_size=cfg.graph_batch_limit,
        max_model_len=max_model_len,
        vocab_size=vocab_size,
        device=device,
        tbo_min_batch=cfg.tbo_threshold,
    )
    runner.capture()
    return runner


def create_piecewise_graphs(
    cfg: EngineConfig, model: nn.Module, kv_pool: KVPagePool, attn_backend: AttentionBackend
) -> PiecewiseGraphRunner | None:
    device = torch.device(cfg.device)
    if not cfg.cuda_graphs or device.type != "cuda" or cfg.max_piecewise_tokens == 0:
        return None
    if not isinstance(model, LlamaForCausalLM):  # the cut points are DecoderLayer's methods
        log.info("piecewise CUDA graphs: %s has no attention cut points; extend runs eagerly", type(model))
        return None
    limit = cfg.piecewise_token_limit(model.config.layer_params(cfg.tp))
    runner = PiecewiseGraphRunner(model, kv_pool, attn_backend, max_tokens=limit, device=device)
    runner.capture()
    return runner


__all__ = [
    "DecodeGraphRunner",
    "PiecewiseGraphRunner",
    "create_decode_graphs",
    "create_piecewise_graphs",
    "graph_batch_sizes",
    "piecewise_buckets",
    "resolve_input_ids",
]
