"""The ``pdserve`` command line: make-model and generate here; the serving commands (prefill, decode,
gateway, up, bench, soak) in ``engine/cli_serving.py``, which imports each service package inside its
handler, so the offline commands need no gRPC stack."""

from __future__ import annotations

import argparse
import logging
import sys
import time
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


def _make_model(args: argparse.Namespace, env: Env) -> int:
    from engine.make_model import make_model

    rope_scaling = None
    if args.rope_scaling_factor:
        rope_scaling = {
            "rope_type": "llama3",
            "factor": args.rope_scaling_factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": args.max_position_embeddings // 4,
        }
    out = make_model(
        args.out_dir,
        arch=args.arch,
        num_layers=args.layers,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or 2 * args.hidden,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        vocab_size=args.vocab_size,
        tie_word_embeddings=args.tie_word_embeddings,
        dtype=args.dtype,
        seed=args.seed,
        max_position_embeddings=args.max_position_embeddings,
        rope_scaling=rope_scaling,
        weights=not args.no_weights,
    )
    print(out)
    return 0


def engine_config_from_args(args: argparse.Namespace, env: Env) -> EngineConfig:
    from engine.config import EngineConfig

    return EngineConfig(
        model=args.model or str(default_model_dir(env)),
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


def _generate(args: argparse.Namespace, env: Env) -> int:
    from engine.engine import Engine
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    llm = LLM.from_engine(Engine(engine_config_from_args(args, env)))
    params = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop or ()),
        ignore_eos=args.ignore_eos,
    )
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    with llm:
        start = time.perf_counter()
        out = llm.generate([prompt], params)[0]
        elapsed = time.perf_counter() - start
    print(out.text)
    print(
        f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}, {elapsed:.2f}s]",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-model", help="write a small random-weight HF-format model")
    mk.add_argument("out_dir")
    mk.add_argument("--arch", choices=["qwen3", "qwen2", "llama"], default="qwen3")
    mk.add_argument("--layers", type=int, default=2)
    mk.add_argument("--hidden", type=int, default=64)
    mk.add_argument("--intermediate", type=int, default=None, help="default: 2 x hidden")
    mk.add_argument("--heads", type=int, default=4)
    mk.add_argument("--kv-heads", type=int, default=2)
    mk.add_argument("--head-dim", type=int, default=None)
    mk.add_argument("--vocab-size", type=int, default=None, help="default: the tokenizer's size")
    mk.add_argument("--tie-word-embeddings", action="store_true")
    mk.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    mk.add_argument("--max-position-embeddings", type=int, default=4096)
    mk.add_argument("--rope-scaling-factor", type=float, default=None, help="llama3-style rope scaling")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument(
        "--no-weights", action="store_true",
        help="config and tokenizer only, for engines run with --load-format dummy (large shapes, benchmarks)",
    )  # fmt: skip
    mk.set_defaults(func=_make_model)

    gen = sub.add_parser("generate", help="offline generation for one prompt")
    add_engine_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(func=_generate)

    from engine.cli_serving import add_serving_commands

    add_serving_commands(sub)
    return parser


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory (default: the embedded tiny model)")
    p.add_argument("--device", default="cpu")
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
    p.add_argument("--attention-backend", default="torch_native")
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
        help="decode eagerly (graphs apply only on CUDA with --attention-backend triton)",
    )  # fmt: skip
    p.add_argument(
        "--no-fused-kernels", action="store_true",
        help="run norms, rotary and SiLU as torch ops on CUDA too (the CPU always does)",
    )  # fmt: skip
    p.add_argument(
        "--no-overlap", action="store_true",
        help="on CUDA, finish each step before scheduling the next (no overlap scheduling)",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    env = Env.read()
    logging.basicConfig(level=env.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args, env)
    except (ValueError, FileNotFoundError) as e:
        print(f"pdserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
