"""Attention backends, registered by name and chosen once at startup.

``torch_native`` is the CPU path and the reference for GPU kernels. GPU backends import their
kernels (Triton) inside their factory, so importing this package never needs a GPU toolchain.
Each backend's ``AttentionCaps`` says where it runs and how it ranks, so ``auto`` (and the engine's
config checks) choose without naming a backend.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.attention.base import AttentionBackend, ForwardBatch, ForwardMode
from engine.config import AUTO, EngineConfig, device_kind
from engine.registry import Registry


@dataclass(frozen=True)
class AttentionCaps:
    """What a backend offers, known without building it."""

    devices: frozenset[str]  # device kinds it runs on ("cpu", "cuda")
    cuda_graphs: bool  # its decode steps can be captured (the class's ``supports_graphs``)
    preference: int  # ``auto`` picks the lowest that runs on the device: the fastest correct one


ATTENTION_BACKENDS: Registry[AttentionBackend, AttentionCaps] = Registry("attention backend")


@ATTENTION_BACKENDS.register(
    "triton", caps=AttentionCaps(devices=frozenset({"cuda"}), cuda_graphs=True, preference=0)
)
def _triton(cfg: EngineConfig) -> AttentionBackend:
    import torch

    from engine.attention.triton_backend import TritonBackend

    return TritonBackend(max_gather_tokens=cfg.max_num_batched_tokens, device=torch.device(cfg.device))


@ATTENTION_BACKENDS.register(
    "torch_native", caps=AttentionCaps(devices=frozenset({"cpu", "cuda"}), cuda_graphs=False, preference=1)
)
def _torch_native(cfg: EngineConfig) -> AttentionBackend:
    from engine.attention.torch_native import TorchNativeBackend

    return TorchNativeBackend(max_gather_tokens=cfg.max_num_batched_tokens)


def resolve_attention_backend(name: str, device: str) -> str:
    """``name`` once checked to exist and run on ``device``; for ``auto``, the preferred backend
    that runs there (CUDA: ``triton``, CPU: ``torch_native``). ``device`` is a resolved one."""
    kind = device_kind(device)
    if name == AUTO:
        fits = [n for n in ATTENTION_BACKENDS.names() if kind in ATTENTION_BACKENDS.caps(n).devices]
        if not fits:
            raise ValueError(f"attention_backend: no backend runs on {device!r}")
        return min(fits, key=lambda n: ATTENTION_BACKENDS.caps(n).preference)
    ATTENTION_BACKENDS.check(name, field="attention_backend")
    devices = ATTENTION_BACKENDS.caps(name).devices
    if kind not in devices:
        raise ValueError(
            f"attention_backend: {name!r} runs on {' or '.join(sorted(devices))}, not on device {device!r}"
        )
    return name


def create_backend(cfg: EngineConfig) -> AttentionBackend:
    """The backend ``cfg`` names (checked and resolved when the config was made)."""
    return ATTENTION_BACKENDS.create(cfg.attention_backend, cfg)


__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "AttentionCaps",
    "ForwardBatch",
    "ForwardMode",
    "create_backend",
    "resolve_attention_backend",
]
