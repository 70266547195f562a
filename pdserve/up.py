"""``pdserve up``: the whole system on this machine. Checks the instance layout (devices, KV
backend, tensor parallelism) before any process starts, builds each instance's argument list, and
hands them to the launcher."""

from __future__ import annotations

import argparse
from collections import Counter

from engine.env import Env
from pdserve.engine_args import add_engine_args, check_device, model_dir
from pdserve.logs import add_log_format
from pdserve.serve import (
    KV_BACKEND_HELP,
    add_gateway_args,
    add_instance_ops_args,
    add_kv_after_prefill,
    add_tls_args,
)
from pdserve.supervisor import RestartPolicy


def add_up_command(sub: argparse._SubParsersAction) -> None:
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
    upp.add_argument(
        "--max-restarts", type=int, default=RestartPolicy.max_restarts,
        help="a child that exits is restarted (exponential backoff); once more than this many times "
        "within --restart-window-s, `up` gives up and stops everything",
    )  # fmt: skip
    upp.add_argument(
        "--restart-window-s", type=float, default=RestartPolicy.window_s, help="see --max-restarts"
    )
    add_instance_ops_args(upp)
    add_gateway_args(upp, with_model_len=False)
    add_log_format(upp)
    add_tls_args(upp)
    upp.set_defaults(func=_up)


def instance_devices(flag: str, value: str | None, default: str, count: int) -> list[str]:
    """One device per instance from ``--prefill-device`` / ``--decode-device`` (one value for all, or
    a comma-separated list with one per instance)."""
    devices = (value or default).split(",")
    if len(devices) == 1:
        devices *= count
    if len(devices) != count or not all(devices):
        raise ValueError(f"{flag}: {value!r} names {len(devices)} devices for {count} instances")
    return devices


def _up(args: argparse.Namespace, env: Env) -> int:
    from pdserve.launcher import up

    if args.num_prefill < 0 or args.num_decode < 1:
        raise ValueError("--num-prefill/--num-decode: at least 0 prefill and 1 decode instance")
    if args.cp != 1:
        raise ValueError(
            f"--cp: `up` starts one-rank instances; run `pdserve prefill --cp N` yourself, got {args.cp}"
        )
    engine = ["--dtype", args.dtype, "--load-format", args.load_format, "--page-size", str(args.page_size),
              "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
              "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--attention-backend", args.attention_backend,
              "--request-timeout-s", str(args.request_timeout_s), "--drain-timeout-s", str(args.drain_timeout_s),
              "--log-stats-interval-s", str(args.log_stats_interval_s), "--log-format", args.log_format]  # fmt: skip
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
    gateway = ["--log-format", args.log_format]
    gateway += ["--max-model-len", str(args.max_model_len)] if args.max_model_len is not None else []
    gateway += gateway_flags(args)
    gateway += tls
    # Only the devices instances will use: checked here, not in the placement (which is pure).
    roles = (["prefill"] if args.num_prefill else []) + ["decode"]
    for role in roles:
        value = getattr(args, f"{role}_device")
        for device in (value or args.device).split(","):
            if device and device != "auto":
                check_device(f"--{role}-device" if value else "--device", device)
    model = model_dir(args.model, env)  # resolved once: every child loads the same directory
    prefill, decode = up_instance_args(args, engine)
    if args.start_timeout_s <= 0:
        raise ValueError(f"--start-timeout-s: must be > 0, got {args.start_timeout_s}")
    if args.drain_timeout_s < 0 or args.log_stats_interval_s < 0:
        raise ValueError("--drain-timeout-s / --log-stats-interval-s: must be >= 0")
    policy = RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window_s)
    return up(
        model, prefill, decode, gateway, args.host, args.port, args.grpc_port, args.start_timeout_s,
        policy, args.drain_timeout_s + 10.0,  # an instance drains, then gets SIGKILL
    )  # fmt: skip


def gateway_flags(args: argparse.Namespace) -> list[str]:
    """Every gateway flag given to ``pdserve up`` (those ``add_gateway_args`` defines) that differs
    from its default, as the gateway child's arguments: a new gateway flag works under ``up``
    without a line here. ``up`` sets the listening address itself."""
    parser = argparse.ArgumentParser(add_help=False)
    add_gateway_args(parser, with_model_len=False)
    flags: list[str] = []
    for action in parser._actions:
        value = getattr(args, action.dest, action.default)
        if (
            not action.option_strings
            or action.dest in ("host", "port", "grpc_port")
            or value == action.default
        ):
            continue
        flag = action.option_strings[0]
        flags += [flag] if isinstance(action, argparse._StoreTrueAction) else [flag, str(value)]
    return flags


def up_instance_args(args: argparse.Namespace, engine: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """Each prefill and decode instance's arguments: the shared engine flags, its device, the KV
    backend (and when prefill sends it) — checked here, so a bad combination fails before any process starts."""
    from engine.config import rank_device, resolve_device
    from kvtransfer import check_kv_backend, kv_backend_caps, kv_backend_names

    per_role: list[list[list[str]]] = []
    roles_devices: list[set[str]] = []
    placed: list[tuple[list[str], list[str]]] = []  # each instance's argv and the devices of its ranks
    for role, count, value in (
        ("prefill", args.num_prefill, args.prefill_device), ("decode", args.num_decode, args.decode_device)
    ):  # fmt: skip
        if count == 0:  # colocated: no prefill instance to check
            per_role.append([])
            continue
        tp = args.tp if getattr(args, f"{role}_tp") is None else getattr(args, f"{role}_tp")
        if tp < 1:
            raise ValueError(f"--{role}-tp: must be >= 1, got {tp}")
        if tp > 1 and not kv_backend_caps(args.kv_backend).tensor_parallel:
            raise ValueError(
                f"--kv-backend: {args.kv_backend} cannot serve a tensor-parallel {role} "
                f"({' / '.join(kv_backend_names(tensor_parallel=True))} can)"
            )
        # auto resolved here, once, so placement (shared GPUs, distinct devices) sees real devices
        devices = [resolve_device(d) for d in instance_devices(f"--{role}-device", value, args.device, count)]
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
        placed += [
            (argv, [rank_device(d, r) for r in range(tp)])
            for argv, d in zip(per_role[-1], devices, strict=True)
        ]
    _share_gpus(args, placed)
    shared = sorted(roles_devices[0] & roles_devices[1]) if len(roles_devices) == 2 else []
    if shared and kv_backend_caps(args.kv_backend).distinct_devices:
        raise ValueError(
            f"--kv-backend: {args.kv_backend} needs prefill and decode on different GPUs, both use "
            f"{', '.join(shared)} (set --prefill-device / --decode-device, or use "
            f"{' / '.join(kv_backend_names(distinct_devices=False))})"
        )
    return per_role[0], per_role[1]


def _share_gpus(args: argparse.Namespace, placed: list[tuple[list[str], list[str]]]) -> None:
    """Instances placed on one GPU split ``--gpu-memory-utilization`` evenly (each instance's pool is
    sized by its share of the device), unless ``--kv-cache-mib`` sizes the pools."""
    if args.kv_cache_mib is not None:
        return
    per_device = Counter(device for _, devices in placed for device in devices)
    for argv, devices in placed:
        sharing = max(per_device[d] for d in devices)
        if sharing > 1 and all(d.startswith("cuda") for d in devices):
            argv += ["--gpu-memory-utilization", f"{args.gpu_memory_utilization / sharing:.4g}"]
