"""The serving subcommands that run one instance: ``prefill``, ``decode`` and ``gateway``. Each
builds its instance's config from the flags (the wiring) and hands it to that service's ``run``,
imported inside the handler so ``pdserve generate`` needs no gRPC stack."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from engine.env import Env
from pdserve.engine_args import add_engine_args, engine_config_from_args, model_dir
from pdserve.logs import add_log_format

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from protos.tls import TLSConfig


KV_BACKEND_HELP = (
    "KV transfer backend, the same on prefill and decode: tcp (any host, any device), cuda_ipc (one host, "
    "CUDA; the receiver maps the sender's pool), nccl (CUDA; a two-rank NCCL group per pair)"
)


def add_serving_commands(sub: argparse._SubParsersAction) -> None:
    """prefill, decode, gateway."""
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
        add_instance_ops_args(svc)
        add_log_format(svc)
        add_tls_args(svc)
        svc.set_defaults(func=_serve, role=role)

    gw = sub.add_parser("gateway", help="run the gateway: OpenAI-compatible REST + public gRPC")
    gw.add_argument(
        "--model", default=None,
        help="HF model directory or a cached hub id, ORG/NAME (default: the embedded tiny model)",
    )  # fmt: skip
    add_gateway_args(gw)
    add_log_format(gw)
    gw.add_argument(
        "--prefill", action="append", default=[],
        help="prefill host:port (repeatable); none: colocated, each decode instance prefills its own requests",
    )  # fmt: skip
    gw.add_argument("--decode", action="append", required=True, help="decode host:port (repeatable)")
    add_tls_args(gw)
    gw.set_defaults(func=_gateway)


def add_instance_ops_args(p: argparse.ArgumentParser) -> None:
    """Drain and stats flags of a prefill / decode instance (``pdserve up`` passes them on)."""
    p.add_argument(
        "--drain-timeout-s", type=float, default=30.0,
        help="on SIGTERM: stop admitting, let running requests finish for at most this long, then exit",
    )  # fmt: skip
    p.add_argument(
        "--log-stats-interval-s", type=float, default=10.0,
        help="log a stats line (running/waiting, tok/s, KV pages, prefix-cache hits, KV transfer) this often; 0: never",
    )  # fmt: skip


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
        "--queue-timeout-s", type=float, default=30.0,
        help="when every instance is full, a request waits this long for room (then 429)",
    )  # fmt: skip
    p.add_argument(
        "--stream-interval", type=int, default=1,
        help="send a streamed event once this many tokens accumulated (the first token at once)",
    )  # fmt: skip
    p.add_argument(
        "--api-key-file", default=None, help="require this key (Bearer) on the API; or $PDSERVE_API_KEY"
    )
    p.add_argument(
        "--disable-log-requests", action="store_true", help="no access line per request at the gateway"
    )
    if with_model_len:
        p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")


def _gateway_config(
    args: argparse.Namespace, env: Env, prefill: list[str], decode: list[str]
) -> GatewayConfig:
    from gateway.config import GatewayConfig

    return GatewayConfig(
        model=model_dir(args.model, env),
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
        stream_interval=args.stream_interval,
        queue_timeout_s=args.queue_timeout_s,
        tls=_tls(args),
        api_key=_api_key(args, env),
        log_requests=not args.disable_log_requests,
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
                drain_timeout_s=args.drain_timeout_s, log_stats_interval_s=args.log_stats_interval_s,
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
            drain_timeout_s=args.drain_timeout_s,
            log_stats_interval_s=args.log_stats_interval_s,
        )
    )
