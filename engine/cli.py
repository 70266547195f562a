"""The ``pdserve`` command line: make-model, generate, and the services (prefill, decode).

The service packages are imported inside their subcommands, so the offline commands need no gRPC."""

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
    from gateway.config import GatewayConfig
    from protos.tls import TLSConfig

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
    )
    print(out)
    return 0


def _engine_config(args: argparse.Namespace, env: Env) -> EngineConfig:
    from engine.config import EngineConfig

    return EngineConfig(
        model=args.model or str(default_model_dir(env)),
        device=args.device,
        dtype=args.dtype,
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
    )


def _generate(args: argparse.Namespace, env: Env) -> int:
    from engine.engine import Engine
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    llm = LLM.from_engine(Engine(_engine_config(args, env)))
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

    for role, port in (("prefill", 8100), ("decode", 8200)):
        svc = sub.add_parser(role, help=f"run a {role} instance (gRPC)")
        add_engine_args(svc)
        svc.add_argument(
            "--host", default="127.0.0.1", help="interface to listen on (default: loopback only)"
        )
        svc.add_argument("--port", type=int, default=port, help="0 picks a free port")
        svc.add_argument("--kv-backend", default="tcp", help="KV transfer backend")
        svc.add_argument(
            "--request-timeout-s", type=float, default=600.0, help="deadline of requests naming none"
        )
        if role == "prefill":
            svc.add_argument("--kv-fault-delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
            svc.add_argument("--max-queued-requests", type=int, default=4096, help="more waiting are refused")
        else:
            svc.add_argument(
                "--advertise-host", default=None, help="host prefill sends KV to (default: --host)"
            )
        add_tls_args(svc)
        svc.set_defaults(func=_serve, role=role)

    gw = sub.add_parser("gateway", help="run the gateway: OpenAI-compatible REST + public gRPC")
    gw.add_argument("--model", default=None, help="HF model directory (default: the embedded tiny model)")
    add_gateway_args(gw)
    gw.add_argument("--prefill", action="append", required=True, help="prefill host:port (repeatable)")
    gw.add_argument("--decode", action="append", required=True, help="decode host:port (repeatable)")
    add_tls_args(gw)
    gw.set_defaults(func=_gateway)

    upp = sub.add_parser("up", help="run prefill, decode and gateway here, on loopback (Ctrl-C stops all)")
    add_engine_args(upp)
    upp.add_argument("--num-prefill", type=int, default=1)
    upp.add_argument("--num-decode", type=int, default=1)
    add_gateway_args(upp, with_model_len=False)
    add_tls_args(upp)
    upp.set_defaults(func=_up)

    bench = sub.add_parser("bench", help="load-test a running gateway (REST or gRPC)")
    from bench.load_test import add_arguments

    add_arguments(bench)
    bench.set_defaults(func=_bench)

    soak = sub.add_parser("soak", help="saturate a running gateway for a while; check for errors and leaks")
    from bench.soak import add_arguments as add_soak_arguments

    add_soak_arguments(soak)
    soak.set_defaults(func=_soak)
    return parser


def add_gateway_args(p: argparse.ArgumentParser, with_model_len: bool = True) -> None:
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="REST port (0 picks a free port)")
    p.add_argument("--grpc-port", type=int, default=8001, help="public gRPC port (0 picks a free port)")
    p.add_argument(
        "--served-model-name", default=None, help="model id clients use (default: the directory name)"
    )
    p.add_argument(
        "--prefill-policy",
        default="prefix_aware",
        help="round_robin | least_load | power_of_two | prefix_aware",
    )
    p.add_argument("--decode-policy", default="least_load", help="round_robin | least_load | power_of_two")
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument(
        "--max-request-bytes", type=int, default=4 << 20, help="larger bodies/messages are refused (413)"
    )
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="larger prompts are refused (413)")
    p.add_argument(
        "--max-concurrent-requests", type=int, default=1024, help="more in flight are refused (429)"
    )
    p.add_argument(
        "--api-key-file", default=None, help="require this key (Bearer) on the API; or $PDSERVE_API_KEY"
    )
    if with_model_len:
        p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")


def _up(args: argparse.Namespace, env: Env) -> int:
    from gateway.up import up

    if args.num_prefill < 1 or args.num_decode < 1:
        raise ValueError("--num-prefill/--num-decode: at least 1 each")
    engine = ["--device", args.device, "--dtype", args.dtype, "--page-size", str(args.page_size),
              "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
              "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--attention-backend", args.attention_backend,
              "--request-timeout-s", str(args.request_timeout_s)]  # fmt: skip
    engine += ["--kv-cache-mib", str(args.kv_cache_mib)] if args.kv_cache_mib is not None else []
    engine += ["--max-model-len", str(args.max_model_len)] if args.max_model_len is not None else []
    engine += ["--no-prefix-cache"] if args.no_prefix_cache else []
    engine += ["--no-cuda-graphs"] if args.no_cuda_graphs else []
    engine += ["--no-fused-kernels"] if args.no_fused_kernels else []
    tls_flags = {"--tls-cert": args.tls_cert, "--tls-key": args.tls_key, "--tls-ca": args.tls_ca}
    tls = [part for flag, value in tls_flags.items() if value for part in (flag, value)]
    engine += tls
    gateway = ["--prefill-policy", args.prefill_policy, "--decode-policy", args.decode_policy,
               "--request-timeout-s", str(args.request_timeout_s)]  # fmt: skip
    gateway += ["--served-model-name", args.served_model_name] if args.served_model_name else []
    gateway += ["--max-model-len", str(args.max_model_len)] if args.max_model_len is not None else []
    gateway += ["--api-key-file", args.api_key_file] if args.api_key_file else []  # else $PDSERVE_API_KEY
    gateway += ["--max-request-bytes", str(args.max_request_bytes), "--max-concurrent-requests",
                str(args.max_concurrent_requests)]  # fmt: skip
    gateway += ["--max-prompt-tokens", str(args.max_prompt_tokens)] if args.max_prompt_tokens else []
    gateway += tls
    model = args.model or str(default_model_dir(env))
    return up(model, args.num_prefill, args.num_decode, engine, gateway, args.host, args.port, args.grpc_port)


def _soak(args: argparse.Namespace, env: Env) -> int:
    from bench.soak import run_from_args

    return run_from_args(args)


def _bench(args: argparse.Namespace, env: Env) -> int:
    from bench.load_test import run_from_args

    return run_from_args(args)


def _gateway_config(
    args: argparse.Namespace, env: Env, prefill: list[str], decode: list[str]
) -> GatewayConfig:
    from gateway.config import GatewayConfig

    return GatewayConfig(
        model=args.model or str(default_model_dir(env)),
        prefill=tuple(prefill),
        decode=tuple(decode),
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        served_model_name=args.served_model_name,
        prefill_policy=args.prefill_policy,
        decode_policy=args.decode_policy,
        request_timeout_s=args.request_timeout_s,
        max_model_len=args.max_model_len,
        max_request_bytes=args.max_request_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_concurrent_requests=args.max_concurrent_requests,
        tls=_tls(args),
        api_key=_api_key(args, env),
    )


def add_tls_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TLS for gRPC (all three files from one internal CA; see docs/SECURITY.md)")
    g.add_argument("--tls-cert", default=None, help="PEM certificate this process presents")
    g.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    g.add_argument(
        "--tls-ca", default=None, help="PEM CA bundle: verify peers and require client certificates"
    )


def _tls(args: argparse.Namespace) -> TLSConfig | None:
    from protos.tls import TLSConfig

    return TLSConfig.from_args(args.tls_cert, args.tls_key, args.tls_ca)


def _api_key(args: argparse.Namespace, env: Env) -> str | None:
    """From --api-key-file, else $PDSERVE_API_KEY: never a command-line value (``ps`` shows those)."""
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text().strip()
        except OSError as e:
            raise ValueError(f"api_key_file: cannot read {args.api_key_file}: {e.strerror}") from None
        if not key:
            raise ValueError(f"api_key_file: {args.api_key_file} is empty (refusing to run without the key)")
        return key
    return env.api_key


def _gateway(args: argparse.Namespace, env: Env) -> int:
    from gateway.server import run

    return run(_gateway_config(args, env, args.prefill, args.decode))


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory (default: the embedded tiny model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
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
    p.add_argument("--no-prefix-cache", action="store_true")
    p.add_argument(
        "--no-cuda-graphs", action="store_true",
        help="decode eagerly (graphs apply only on CUDA with --attention-backend triton)",
    )  # fmt: skip
    p.add_argument(
        "--no-fused-kernels", action="store_true",
        help="run norms, rotary and SiLU as torch ops on CUDA too (the CPU always does)",
    )  # fmt: skip


def _serve(args: argparse.Namespace, env: Env) -> int:
    engine_cfg = _engine_config(args, env)
    if args.role == "prefill":
        from prefill_svc.server import PrefillConfig
        from prefill_svc.server import run as run_prefill

        return run_prefill(
            PrefillConfig(
                engine_cfg, args.host, args.port, args.kv_backend, args.request_timeout_s,
                kv_chunk_delay_s=args.kv_fault_delay_ms / 1e3, tls=_tls(args),
                max_queued_requests=args.max_queued_requests,
            )
        )  # fmt: skip
    from decode_svc.server import DecodeConfig
    from decode_svc.server import run as run_decode

    return run_decode(
        DecodeConfig(
            engine_cfg,
            args.host,
            args.port,
            args.kv_backend,
            args.request_timeout_s,
            args.advertise_host,
            tls=_tls(args),
        )
    )


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
