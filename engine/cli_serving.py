"""The serving subcommands of ``pdserve``: prefill, decode, gateway, up, bench, soak.

Each imports its service package inside its handler, so ``pdserve generate`` needs no gRPC stack.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from engine.cli import add_engine_args, default_model_dir, engine_config_from_args
from engine.env import Env

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from protos.tls import TLSConfig


KV_BACKEND_HELP = (
    "KV transfer backend, the same on prefill and decode: tcp (any host, any device), cuda_ipc (one host, "
    "CUDA; the receiver maps the sender's pool), nccl (CUDA; a two-rank NCCL group per pair)"
)


def instance_devices(flag: str, value: str | None, default: str, count: int) -> list[str]:
    """One device per instance from ``--prefill-device`` / ``--decode-device`` (one value for all, or
    a comma-separated list with one per instance)."""
    devices = (value or default).split(",")
    if len(devices) == 1:
        devices *= count
    if len(devices) != count or not all(devices):
        raise ValueError(f"{flag}: {value!r} names {len(devices)} devices for {count} instances")
    return devices


def add_serving_commands(sub: argparse._SubParsersAction) -> None:
    """prefill, decode, gateway, up, bench, soak."""
    for role, port in (("prefill", 8100), ("decode", 8200)):
        svc = sub.add_parser(role, help=f"run a {role} instance (gRPC)")
        add_engine_args(svc)
        svc.add_argument(
            "--host", default="127.0.0.1", help="interface to listen on (default: loopback only)"
        )
        svc.add_argument("--port", type=int, default=port, help="0 picks a free port")
        svc.add_argument("--kv-backend", default="tcp", help=KV_BACKEND_HELP)
        svc.add_argument(
            "--request-timeout-s", type=float, default=600.0, help="deadline of requests naming none"
        )
        if role == "prefill":
            svc.add_argument("--kv-fault-delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
            svc.add_argument("--max-queued-requests", type=int, default=4096, help="more waiting are refused")
            add_kv_after_prefill(svc)
        else:
            svc.add_argument(
                "--advertise-host", default=None, help="host prefill sends KV to (default: --host)"
            )
        add_tls_args(svc)
        svc.set_defaults(func=_serve, role=role)

    gw = sub.add_parser("gateway", help="run the gateway: OpenAI-compatible REST + public gRPC")
    gw.add_argument("--model", default=None, help="HF model directory (default: the embedded tiny model)")
    add_gateway_args(gw)
    gw.add_argument(
        "--prefill", action="append", default=[],
        help="prefill host:port (repeatable); none: colocated, each decode instance prefills its own requests",
    )  # fmt: skip
    gw.add_argument("--decode", action="append", required=True, help="decode host:port (repeatable)")
    add_tls_args(gw)
    gw.set_defaults(func=_gateway)

    upp = sub.add_parser("up", help="run prefill, decode and gateway here, on loopback (Ctrl-C stops all)")
    add_engine_args(upp)
    upp.add_argument(
        "--num-prefill", type=int, default=1,
        help="0: colocated, no disaggregation (each decode instance prefills its own requests)",
    )  # fmt: skip
    upp.add_argument("--num-decode", type=int, default=1)
    upp.add_argument(
        "--prefill-tp", type=int, default=None, help="tensor-parallel ranks per prefill (default: --tp)"
    )
    upp.add_argument(
        "--decode-tp", type=int, default=None, help="tensor-parallel ranks per decode (default: --tp)"
    )
    upp.add_argument(
        "--prefill-device", default=None,
        help="device of the prefill instances, e.g. cuda:0, or one per instance: cuda:0,cuda:1 (default: --device)",
    )  # fmt: skip
    upp.add_argument("--decode-device", default=None, help="the same for the decode instances, e.g. cuda:1")
    upp.add_argument("--kv-backend", default="tcp", help=KV_BACKEND_HELP)
    add_kv_after_prefill(upp)
    upp.add_argument(
        "--start-timeout-s", type=float, default=600.0,
        help="every instance loads and the gateway is healthy within this, or everything stops",
    )  # fmt: skip
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


def add_kv_after_prefill(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kv-after-prefill", action="store_true",
        help="prefill sends a prompt's KV once its prefill finished (default: layer by layer, overlapped "
        "with the prefill; tensor-parallel prefill always sends after)",
    )  # fmt: skip


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
    p.add_argument(
        "--decode-policy", default="least_load",
        help="round_robin | least_load | power_of_two (colocated, no prefill instances: prefix_aware too)",
    )  # fmt: skip
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

    if args.num_prefill < 0 or args.num_decode < 1:
        raise ValueError("--num-prefill/--num-decode: at least 0 prefill and 1 decode instance")
    if args.cp != 1:
        raise ValueError(
            f"--cp: `up` starts one-rank instances; run `pdserve prefill --cp N` yourself, got {args.cp}"
        )
    engine = ["--dtype", args.dtype, "--load-format", args.load_format, "--page-size", str(args.page_size),
              "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
              "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--attention-backend", args.attention_backend,
              "--request-timeout-s", str(args.request_timeout_s)]  # fmt: skip
    engine += ["--kv-cache-mib", str(args.kv_cache_mib)] if args.kv_cache_mib is not None else []
    engine += ["--max-model-len", str(args.max_model_len)] if args.max_model_len is not None else []
    engine += ["--no-prefix-cache"] if args.no_prefix_cache else []
    engine += ["--no-cuda-graphs"] if args.no_cuda_graphs else []
    engine += ["--no-fused-kernels"] if args.no_fused_kernels else []
    engine += ["--no-overlap"] if args.no_overlap else []
    engine += ["--no-symmetric-memory"] if args.no_symmetric_memory else []
    engine += ["--mixed-batches"] if args.mixed_batches else []
    engine += ["--tbo-min-batch", str(args.tbo_min_batch)] if args.tbo_min_batch is not None else []
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
    prefill, decode = up_instance_args(args, engine)
    if args.start_timeout_s <= 0:
        raise ValueError(f"--start-timeout-s: must be > 0, got {args.start_timeout_s}")
    return up(model, prefill, decode, gateway, args.host, args.port, args.grpc_port, args.start_timeout_s)


def up_instance_args(args: argparse.Namespace, engine: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """Each prefill and decode instance's arguments: the shared engine flags, its device, the KV
    backend (and when prefill sends it) — checked here, so a bad combination fails before any process starts."""
    from engine.config import rank_device
    from kvtransfer import check_kv_backend

    per_role: list[list[list[str]]] = []
    roles_devices: list[set[str]] = []
    for role, count, value in (
        ("prefill", args.num_prefill, args.prefill_device), ("decode", args.num_decode, args.decode_device)
    ):  # fmt: skip
        if count == 0:  # colocated: no prefill instance to check
            per_role.append([])
            continue
        tp = args.tp if getattr(args, f"{role}_tp") is None else getattr(args, f"{role}_tp")
        if tp < 1:
            raise ValueError(f"--{role}-tp: must be >= 1, got {tp}")
        if tp > 1 and args.kv_backend != "tcp":
            raise ValueError(
                f"--kv-backend: {args.kv_backend} cannot serve a tensor-parallel {role} (tcp can)"
            )
        devices = instance_devices(f"--{role}-device", value, args.device, count)
        for device in devices:
            check_kv_backend(args.kv_backend, device)
        own = ["--kv-after-prefill"] if role == "prefill" and args.kv_after_prefill else []
        per_role.append(
            [
                [*engine, "--device", d, "--kv-backend", args.kv_backend, "--tp", str(tp), *own]
                for d in devices
            ]
        )
        roles_devices.append({rank_device(d, r) for d in devices for r in range(tp)})
    if args.kv_backend == "nccl" and len(roles_devices) == 2 and roles_devices[0] & roles_devices[1]:
        shared = sorted(roles_devices[0] & roles_devices[1])
        raise ValueError(
            f"--kv-backend: nccl needs prefill and decode on different GPUs, both use {', '.join(shared)} "
            "(set --prefill-device / --decode-device, or use cuda_ipc / tcp)"
        )
    return per_role[0], per_role[1]


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


def _serve(args: argparse.Namespace, env: Env) -> int:
    engine_cfg = engine_config_from_args(args, env)
    if args.role == "prefill":
        from prefill_svc.server import PrefillConfig
        from prefill_svc.server import run as run_prefill

        return run_prefill(
            PrefillConfig(
                engine_cfg, args.host, args.port, args.kv_backend, args.request_timeout_s,
                kv_chunk_delay_s=args.kv_fault_delay_ms / 1e3, tls=_tls(args),
                max_queued_requests=args.max_queued_requests, kv_layerwise=not args.kv_after_prefill,
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
