"""Attention backends, registered by name and chosen once at startup.

``torch_native`` is the CPU path and the reference for GPU kernels. GPU backends import their
kernels (Triton) inside their factory, so importing this package never needs a GPU toolchain.
"""

from __future__ import annotations

from collections.abc import Callable

from engine.attention.base import AttentionBackend, ForwardBatch, ForwardMode
from engine.config import EngineConfig

Factory = Callable[[EngineConfig], AttentionBackend]
_FACTORIES: dict[str, Factory] = {}


def register_backend(name: str) -> Callable[[Factory], Factory]:
    def wrap(factory: Factory) -> Factory:
        assert name not in _FACTORIES, f"attention backend {name!r} registered twice"
        _FACTORIES[name] = factory
        return factory

    return wrap


@register_backend("torch_native")
def _torch_native(cfg: EngineConfig) -> AttentionBackend:
    from engine.attention.torch_native import TorchNativeBackend

    return TorchNativeBackend(max_gather_tokens=cfg.max_num_batched_tokens)


@register_backend("triton")
def _triton(cfg: EngineConfig) -> AttentionBackend:
    import torch

    from engine.attention.triton_backend import TritonBackend

    device = torch.device(cfg.device)
    if device.type != "cuda":
        raise ValueError(f"attention_backend: 'triton' needs a CUDA device, got {cfg.device!r}")
    return TritonBackend(max_gather_tokens=cfg.max_num_batched_tokens, device=device)


def create_backend(cfg: EngineConfig) -> AttentionBackend:
    name = cfg.attention_backend
    if name not in _FACTORIES:
        raise ValueError(f"attention_backend: unknown backend {name!r}; available: {sorted(_FACTORIES)}")
    return _FACTORIES[name](cfg)


__all__ = ["AttentionBackend", "ForwardBatch", "ForwardMode", "create_backend", "register_backend"]
