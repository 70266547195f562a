"""Configuration as data: the model's shape (read from an HF ``config.json``) and the engine's knobs.

Both are frozen dataclasses validated in ``__post_init__`` and resolved once at the entry point;
nothing reads configuration from globals later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


# Names only, so that reading a model's config (the gateway does) needs no torch.
DTYPES = ("float32", "bfloat16", "float16")
AUTO = "auto"  # a device or attention backend chosen for the host (``EngineConfig``)
# What an H100 computes in bf16 projections (~750 TFLOP/s) while its host launches one decoder layer
# eagerly (~0.6 ms: norms, projections, fused Triton kernels, varlen attention), measured
# (docs/BENCHMARKS.md); sets the default piecewise-graph limit (``EngineConfig.piecewise_token_limit``).
EAGER_LAYER_LAUNCH_FLOPS = 4.5e11
PIECEWISE_MIN_TOKENS = 2048  # piecewise graphs measured to pay up to here on both Qwen3 shapes benched


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters. ``scaling`` is "default" or "llama3" (Llama 3.1 frequency scaling)."""

    theta: float = 10000.0
    scaling: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.scaling not in ("default", "llama3"):
            raise ValueError(f"rope_scaling: rope_type {self.scaling!r} is not supported (default, llama3)")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> RopeConfig:
        # transformers >= 5 writes "rope_parameters" (theta inside); hub checkpoints use the legacy
        # top-level "rope_theta" + "rope_scaling". Accept both.
        params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default"))
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return cls(theta=float(theta), scaling=str(kind), **{k: params[k] for k in keys if k in params})


@dataclass(frozen=True)
class ModelConfig:
    """The model's shape, from its HF ``config.json``; ``dtype`` is the compute/storage dtype to use."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope: RopeConfig
    dtype: str
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads})"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_params(self, tp_size: int = 1) -> int:
        """Weights of one decoder layer's projections (q/k/v, o, gate/up, down) on each of
        ``tp_size`` tensor-parallel ranks."""
        heads, kv_heads = self.tp_heads(tp_size)
        attn = self.hidden_size * (2 * heads + 2 * kv_heads) * self.head_dim
        return attn + 3 * self.hidden_size * (self.intermediate_size // tp_size)

    def extend_layer_flops(self, extend_lens: list[int], seq_lens: list[int], tp_size: int = 1) -> float:
        """One decoder layer's FLOPs in an EXTEND step, on each of ``tp_size`` ranks: projections (2
        per weight and token) and causal attention (4 per query-key pair and head dimension; a new
        token sees its sequence's cached prefix and the new tokens up to itself)."""
        heads, _ = self.tp_heads(tp_size)
        pairs = sum(e * (n - e) + e * (e + 1) // 2 for e, n in zip(extend_lens, seq_lens, strict=True))
        return 2 * self.layer_params(tp_size) * sum(extend_lens) + 4 * heads * self.head_dim * pairs

    def tp_heads(self, tp_size: int) -> tuple[int, int]:
        """(q heads, kv heads) each of ``tp_size`` tensor-parallel ranks holds (and its KV pool
        stores). Q heads are split evenly; kv heads are split when there are at least as many as
        ranks, else each rank holds one, shared by ``tp_size // num_kv_heads`` ranks (vLLM's rule).
        Shapes that do not divide are a ValueError naming the field."""
        if self.num_heads % tp_size:
            raise ValueError(
                f"num_attention_heads: {self.num_heads} heads cannot be split evenly over tp_size={tp_size}"
            )
        if self.num_kv_heads >= tp_size:
            if self.num_kv_heads % tp_size:
                raise ValueError(
                    f"num_key_value_heads: {self.num_kv_heads} heads cannot be split evenly over "
                    f"tp_size={tp_size}"
                )
            return self.num_heads // tp_size, self.num_kv_heads // tp_size
        if tp_size % self.num_kv_heads:
            raise ValueError(
                f"num_key_value_heads: {self.num_kv_heads} heads cannot be replicated evenly over "
                f"tp_size={tp_size} (it must be a multiple of them)"
            )
        return self.num_heads // tp_size, 1

    @classmethod
    def from_dir(cls, model_dir: str | Path, dtype: str = "auto") -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json (is this an HF model directory?)")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        archs = cfg.get("architectures") or []
        if len(archs) != 1:
            raise ValueError(f"{path}: 'architectures' must name exactly one class, got {archs!r}")
        if dtype == "auto":
            dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        for unsupported in ("use_sliding_window", "mlp_bias"):
            if cfg.get(unsupported):
                raise ValueError(f"{path}: {unsupported}=true is not supported yet")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        try:
            num_heads = cfg["num_attention_heads"]
            return cls(
                architecture=archs[0],
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                num_layers=cfg["num_hidden_layers"],
                num_heads=num_heads,
                num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                max_position_embeddings=cfg.get("max_position_embeddings", 4096),
                tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                attention_bias=cfg.get("attention_bias", False),
                rope=RopeConfig.from_hf(cfg),
                dtype=dtype,
                eos_token_ids=eos_ids,
            )
        except KeyError as e:
            raise ValueError(f"{path}: missing required field {e.args[0]!r}") from None


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of one engine instance (one model replica on one device).

    KV cache size: ``kv_cache_bytes`` when set; otherwise on CUDA ``gpu_memory_utilization`` is this
    instance's share of the device's memory: the pool gets that share less the instance's own weights
    and profiled peak activations (other processes' memory does not count against it), and never
    more than is free less a margin. Instances sharing a GPU split it by their utilizations
    (``pdserve up`` divides the utilization among the instances it places on one device); on CPU the
    pool is 256 MiB.
    ``max_num_batched_tokens`` is the per-step token budget and therefore the chunked-prefill chunk
    size.

    ``cuda_graphs``: replay decode steps of up to ``graph_batch_limit`` sequences from CUDA graphs
    (``engine.graphs``), effective only on CUDA with an attention backend that supports graphs
    (``triton``; ignored, with a log line, otherwise); and run EXTEND steps of up to
    ``piecewise_token_limit`` tokens as piecewise CUDA graphs (attention eager between them) while
    that pays (``ModelRunner.prepare``), on CUDA with any backend. The graphs' memory comes on top
    of the KV cache budget (hundreds of MiB to ~1 GiB: the static ``[batch, vocab]`` logits, the
    piecewise buffers and pool, which grow with the piecewise limit; logged at startup).

    ``fused_kernels``: run RMSNorm (+ residual add), SiLU·up and q/k-norm + rotary as fused Triton
    kernels (``engine.layers.kernels``, ``triton``) instead of torch ops. Effective only on CUDA;
    the CPU always runs the ``torch`` ops.

    ``overlap``: overlap scheduling (``engine.engine``): the host prepares step N+1 and
    postprocesses step N-1 while the device runs step N. None (the default) turns it on for CUDA;
    on the CPU there is nothing to overlap with, so it only delays outputs by a step (tests turn it
    on to prove the bookkeeping).

    ``tp``: tensor-parallel ranks (#7). With more than one, the engine's process is rank 0 and
    starts ranks 1..tp-1 as worker processes (``engine.distributed.workers``); on CUDA rank r uses
    the r-th GPU counted from ``device``.

    ``symmetric_memory``: with tp > 1 on CUDA, all-reduce through symmetric-memory buffers
    (``engine.distributed.symmetric``) wherever a message fits them (every all-reduce inside the
    decode and piecewise graphs); with cp > 1 on CUDA, the per-layer K/V all-gather writes into the
    peers' symmetric receive buffers. Off: NCCL for everything.

    ``mixed_batches``: schedule every decoding sequence's token into each step and fill the rest of
    the budget with prompt chunks (``engine.scheduler``), instead of prefill first; for an engine
    that prefills and decodes alike (offline, colocated serving).

    ``tbo_min_batch``: two-batch overlap (``engine.graphs.two_batch``) for captured decode batches
    of at least this many rows, with tp > 1 on CUDA; 0 or None (the default, until measured): off.

    ``cp``: context-parallel ranks (#8): every rank holds the whole model; an EXTEND step of at least
    ``cp * cp_min_tokens`` new tokens is split zigzag over the ranks (each computes its share of the
    tokens, K/V are all-gathered per layer), smaller steps and decode run whole on every rank
    (``engine.distributed.context_parallel``). Ranks as for ``tp``; not combined with ``tp`` yet.

    ``device`` / ``attention_backend`` ``"auto"``: resolved in ``__post_init__`` (the engine logs the
    result at start-up), so
    every config holds concrete names: the device is ``cuda:0`` when torch sees CUDA, else ``cpu``
    (``resolve_device``); the backend is the preferred one that runs on the device
    (``engine.attention.resolve_attention_backend``: ``triton`` on CUDA, ``torch_native`` on CPU).
    A named backend is checked there too: it must exist and run on the device.
    """

    model: str
    dtype: str = "auto"
    device: str = "cpu"
    page_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.85
    attention_backend: str = "torch_native"
    load_format: str = "safetensors"  # "dummy": random weights, no files read (benchmarks)
    enable_prefix_cache: bool = True
    seed: int = 0
    cuda_graphs: bool = True
    max_graph_batch_size: int | None = None  # None: min(max_num_seqs, 256)
    fused_kernels: bool = True
    overlap: bool | None = None  # None: on for CUDA, off for CPU
    max_piecewise_tokens: int | None = None  # None: by model size (piecewise_token_limit); 0: none
    tp: int = 1
    symmetric_memory: bool = True
    mixed_batches: bool = False
    tbo_min_batch: int | None = None
    cp: int = 1
    cp_min_tokens: int = 128  # a step is split over the cp ranks when each gets at least this many

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", resolve_device(self.device))  # frozen: set once, here
        checks = [
            (self.page_size >= 1 and self.page_size & (self.page_size - 1) == 0, "page_size", "a power of 2"),
            (self.max_num_seqs >= 1, "max_num_seqs", ">= 1"),
            (self.tp >= 1, "tp", ">= 1"),
            (self.cp >= 1, "cp", ">= 1"),
            (self.cp_min_tokens >= 1, "cp_min_tokens", ">= 1"),
            (self.max_num_batched_tokens >= self.page_size, "max_num_batched_tokens", ">= page_size"),
            (self.kv_cache_bytes is None or self.kv_cache_bytes > 0, "kv_cache_bytes", "> 0 or None (auto)"),
            (0.0 < self.gpu_memory_utilization < 1.0, "gpu_memory_utilization", "in (0, 1)"),
            (device_kind(self.device) in ("cpu", "cuda"), "device", "cpu, cuda[:N] or auto"),
            (self.load_format in ("safetensors", "dummy"), "load_format", "safetensors or dummy"),
            (
                self.max_piecewise_tokens is None or self.max_piecewise_tokens >= 0,
                "max_piecewise_tokens",
                ">= 0 or None (auto)",
            ),
            (self.tbo_min_batch is None or self.tbo_min_batch >= 0, "tbo_min_batch", ">= 0 or None (auto)"),
            (
                self.max_graph_batch_size is None or self.max_graph_batch_size >= 1,
                "max_graph_batch_size",
                ">= 1 or None (auto)",
            ),
        ]
        for ok, name, want in checks:
            if not ok:
                raise ValueError(f"{name}: must be {want}, got {getattr(self, name)!r}")
        if self.cp > 1 and self.tp > 1:
            raise ValueError(
                f"cp: context parallelism does not combine with tensor parallelism yet (tp={self.tp}, "
                f"cp={self.cp}); set one of them to 1"
            )
        from engine.attention import resolve_attention_backend  # torch: a config is built to run an engine

        # The choice is logged when the engine starts (ModelRunner), not here: a config is also
        # built for checks that start nothing.
        object.__setattr__(
            self, "attention_backend", resolve_attention_backend(self.attention_backend, self.device)
        )

    @property
    def num_ranks(self) -> int:
        """Processes the engine runs on: ``tp`` or ``cp`` (they do not combine yet)."""
        return self.tp * self.cp

    def piecewise_token_limit(self, layer_params: int = 0) -> int:
        """The largest EXTEND step run from piecewise graphs (0: none), capped by the step token
        budget: ``max_piecewise_tokens``, or by default the step size at which the GPU work of a
        layer's projections (2 FLOP per weight, ``layer_params`` weights, per token) takes as long
        as the host takes to launch that layer eagerly (``EAGER_LAYER_LAUNCH_FLOPS``), rounded down
        to 512 tokens and never under ``PIECEWISE_MIN_TOKENS``. Below it an eager step is host-bound
        and graphs win; above it the step is GPU-bound and the pieces' buffer copies cost more than
        the launches they save (docs/BENCHMARKS.md: an 8B layer, 190M weights, crosses over near
        2048 tokens; a 0.6B one, 16M weights, is host-bound at a whole 8k-token chunk of short
        prompts). Attention counts too: a step above ``PIECEWISE_MIN_TOKENS`` whose attention makes
        it GPU-bound runs eagerly (``ModelRunner.prepare``). ``layer_params`` 0 (unknown): 2048."""
        if self.max_piecewise_tokens is not None:
            limit = self.max_piecewise_tokens
        else:
            host_bound = (
                int(EAGER_LAYER_LAUNCH_FLOPS / (2 * layer_params)) // 512 * 512 if layer_params else 0
            )
            limit = max(PIECEWISE_MIN_TOKENS, host_bound)
        return min(limit, self.max_num_batched_tokens)

    @property
    def graph_batch_limit(self) -> int:
        """The largest decode batch captured in a CUDA graph: no decode batch is ever larger than
        ``min(max_num_seqs, max_num_batched_tokens)`` (the scheduler's admission limit)."""
        limit = min(self.max_num_seqs, self.max_num_batched_tokens)
        return min(limit, self.max_graph_batch_size or 256)

    @property
    def tbo_threshold(self) -> int:
        """The smallest decode graph run as two micro-batches (0: never): only with tp > 1, where
        there is communication to hide. Default: off until the 2-GPU measurement (docs/BENCHMARKS.md)
        says from which batch size it pays."""
        if self.tp == 1 or self.tbo_min_batch is None:
            return 0
        return self.tbo_min_batch


def rank_device(device: str, rank: int) -> str:
    """Rank ``rank``'s device: the CPU for every rank, or the ``rank``-th GPU from ``device``'s."""
    kind, _, index = device.partition(":")
    return device if kind == "cpu" else f"cuda:{int(index or 0) + rank}"


def resolve_device(device: str, cuda_available: bool | None = None) -> str:
    """``device``, or for ``auto`` ``cuda:0`` when CUDA is available, else ``cpu``.
    ``cuda_available``: the answer to use (None: ask torch)."""
    if device != AUTO:
        return device
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    return "cuda:0" if cuda_available else "cpu"


def device_kind(device: str) -> str:
    """``cuda`` for ``cuda:1``: what backends' capability records name."""
    return device.partition(":")[0]
