"""CUDA graph runners, chosen once at startup: decode graphs (#5); piecewise prefill graphs are #6.

``create_decode_graphs`` returns a captured ``DecodeGraphRunner``, or None (the engine stays eager)
unless the config asks for graphs (``cuda_graphs``, the default), the device is CUDA and the
attention backend can run inside a graph (``AttentionBackend.supports_graphs``: ``triton`` can;
``torch_native`` cannot, its decode sizes its gathers from host-side sequence lengths).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine.attention.base import AttentionBackend
from engine.config import EngineConfig
from engine.graphs.decode_graphs import DecodeGraphRunner, graph_batch_sizes
from engine.kvcache.page_pool import KVPagePool

log = logging.getLogger(__name__)


def create_decode_graphs(
    cfg: EngineConfig,
    model: nn.Module,
    kv_pool: KVPagePool,
    attn_backend: AttentionBackend,
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
        max_batch_size=cfg.graph_batch_limit,
        max_model_len=max_model_len,
        vocab_size=vocab_size,
        device=device,
    )
    runner.capture()
    return runner


__all__ = ["DecodeGraphRunner", "create_decode_graphs", "graph_batch_sizes"]
