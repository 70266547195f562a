"""The offline subcommands: ``make-model`` (a random-weight HF-format model) and ``generate`` (one
prompt through an in-process engine)."""

from __future__ import annotations

import argparse
import sys
import time

from engine.env import Env
from pdserve.engine_args import add_engine_args, engine_config_from_args


def add_offline_commands(sub: argparse._SubParsersAction) -> None:
    """make-model, generate."""
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
    mk.add_argument(
        "--tokenizer-size", type=int, default=None,
        help="tokens in the tokenizer (default: a 1,024-token BPE); e.g. 151936 to detokenize a real vocab's ids",
    )  # fmt: skip
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
        tokenizer_size=args.tokenizer_size,
    )
    print(out)
    return 0


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
