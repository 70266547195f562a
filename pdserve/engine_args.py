"""The engine flags every engine-running command shares (generate, prefill, decode, up), the
``EngineConfig`` they resolve to, the model a ``--model`` value names (a directory, a Hugging Face
hub id found in the local cache, or the embedded tiny model when none is given), and the device
check that turns "this torch has no CUDA" into one line naming the fix."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from engine.env import Env

if TYPE_CHECKING:
    from engine.config import EngineConfig

TINY_MODEL_NAME = "tiny-qwen3"


def default_model_dir(env: Env) -> Path:
    """The embedded tiny model, made on first use (no download: random weights, our tokenizer)."""
    from engine.make_model import DEFAULT_TINY, make_model

    path = env.cache_dir / "models" / TINY_MODEL_NAME
    if not (path / "config.json").is_file():
        logging.getLogger("pdserve").info("making the embedded tiny model at %s", path)
        make_model(path, **DEFAULT_TINY)
    return path


def model_dir(value: str | None, env: Env) -> str:
    """The directory ``--model`` names: a directory as given; ``ORG/NAME`` from the local Hugging
    Face cache (``HF_HOME`` / ``HF_HUB_CACHE``, never the network); None: the embedded tiny model."""
    if value is None:
        return str(default_model_dir(env))
    if Path(value).exists() or value.count("/") != 1 or value.startswith((".", "/")):
        return value  # a path (a missing one is reported by whoever reads it, naming the file)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(value, local_files_only=True)
    except LocalEntryNotFoundError:
        raise ValueError(
            f"--model {value}: not a directory here and not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); download it first (`hf download {value}`) or pass its directory"
        ) from None


def check_device(flag: str, device: str) -> None:
    """``device`` can be used by this torch build; else one line saying what to do instead."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build, but no GPU is visible"
        raise ValueError(
            f"{flag} {device}: this torch ({torch.__version__}) is {build}; use --device cpu (or auto), "
            "or install a CUDA build of torch on a machine with a GPU"
        )
    index = device.partition(":")[2]
    if index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"{flag} {device}: only {torch.cuda.device_count()} GPUs are visible")


def engine_config_from_args(args: argparse.Namespace, env: Env) -> EngineConfig:
    from engine.config import EngineConfig

    check_device("--device", args.device)
    return EngineConfig(
        model=model_dir(args.model, env),
        device=args.device,
        dtype=args.dtype,
        load_format=args.load_format,
        page_size=args.page_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        kv_cache_bytes=None if args.kv_cache_mib is None else args.kv_cache_mib << 20,
        gpu_memory_utilization=args.gpu_memory_utilization,
        attention_backend=args.attention_backend,
        enable_prefix_cache=not args.no_prefix_cache,
        cuda_graphs=not args.no_cuda_graphs,
        fused_kernels=not args.no_fused_kernels,
        overlap=False if args.no_overlap else None,
        tp=args.tp,
        symmetric_memory=not args.no_symmetric_memory,
        mixed_batches=args.mixed_batches,
        tbo_min_batch=args.tbo_min_batch,
        cp=args.cp,
        cp_min_tokens=args.cp_min_tokens,
    )


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None,
        help="HF model directory, or a hub id (ORG/NAME) already in the local Hugging Face cache "
        "(default: the embedded tiny model)",
    )  # fmt: skip
    p.add_argument(
        "--device", default="auto",
        help="cpu, cuda, cuda:N, or auto: the first GPU when CUDA is available, else the CPU",
    )  # fmt: skip
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--load-format", choices=["safetensors", "dummy"], default="safetensors",
        help="dummy: seeded random weights of the config's shape, no weight files read (benchmarks)",
    )  # fmt: skip
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most sequences running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=4096, help="step token budget = chunk size")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument(
        "--kv-cache-mib", type=int, default=None,
        help="KV cache size (default: 256 MiB on CPU; on CUDA what --gpu-memory-utilization leaves)",
    )  # fmt: skip
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument(
        "--attention-backend", default="auto",
        help="torch_native, triton, or auto: the fastest correct backend for the device (CUDA: triton, "
        "which enables decode graphs and fused kernels; CPU: torch_native)",
    )  # fmt: skip
    p.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel ranks (processes; on CUDA one GPU each)"
    )
    p.add_argument(
        "--no-symmetric-memory", action="store_true",
        help="with --tp on CUDA, all-reduce through NCCL only (default: symmetric memory inside graphs)",
    )  # fmt: skip
    p.add_argument(
        "--tbo-min-batch", type=int, default=None,
        help="with --tp on CUDA, run decode batches of at least this many rows as two overlapped "
        "micro-batches (default: off until measured on GPUs)",
    )  # fmt: skip
    p.add_argument(
        "--cp", type=int, default=1,
        help="context-parallel ranks: long prefills split over processes (on CUDA one GPU each)",
    )  # fmt: skip
    p.add_argument(
        "--cp-min-tokens", type=int, default=128,
        help="with --cp: a prefill step is split when each rank gets at least this many tokens",
    )  # fmt: skip
    p.add_argument(
        "--mixed-batches", action="store_true",
        help="every step decodes the running sequences and fills the rest with prompt chunks (default: prefill first)",
    )  # fmt: skip
    p.add_argument("--no-prefix-cache", action="store_true")
    p.add_argument(
        "--no-cuda-graphs", action="store_true",
        help="decode eagerly (graphs apply on CUDA with the triton attention backend, the auto choice there)",
    )  # fmt: skip
    p.add_argument(
        "--no-fused-kernels", action="store_true",
        help="run norms, rotary and SiLU as torch ops on CUDA too (the CPU always does)",
    )  # fmt: skip
    p.add_argument(
        "--no-overlap", action="store_true",
        help="on CUDA, finish each step before scheduling the next (no overlap scheduling)",
    )  # fmt: skip
