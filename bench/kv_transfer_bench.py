"""KV transfer cost per backend on two GPUs of one host, for Qwen3-8B-shaped KV (36 layers, 8 kv
heads, head_dim 128, bf16, 16-token pages): the sender process holds a random pool on
``--src-device``, the receiver (this process) one on ``--dst-device``; each prompt's pages are
scattered over both pools. Timed: first ``send_layer`` → commit acknowledged (the sender's clock;
the handshake happens in a warm-up). Every run is checked bit-exact.

The goal: cuda_ipc or nccl ≤ 5 % of the prompt's prefill time. Prefill time here is its
floor, 2·params·tokens + causal attention FLOPs at this GPU's measured bf16 GEMM rate, so the
ratio printed is an upper bound of the real one.

    python -m bench.kv_transfer_bench --backends cuda_ipc,nccl,tcp --tokens 1024,4096,16384,32768 --out runs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import grpc
import torch

from bench.kv_peer import PoolShape, SenderProcess, Transfer, fill_pool
from kvtransfer import TransferState, create_receiver

QWEN3_8B = dict(num_layers=36, num_kv_heads=8, head_dim=128, num_heads=32)
QWEN3_8B_PARAMS = 8.19e9
SEED = 3


def gemm_tflops(device: str) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    return 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else device


def prefill_floor_ms(tokens: int, tflops: float) -> float:
    m = QWEN3_8B
    attention = 2 * tokens**2 * m["num_heads"] * m["head_dim"] * m["num_layers"]  # QK^T + PV, causal half
    return (2 * QWEN3_8B_PARAMS * tokens + attention) / (tflops * 1e12) * 1e3


async def bench_backend(
    backend: str, args: argparse.Namespace, shape: PoolShape, ref: torch.Tensor
) -> list[dict]:
    pool = shape.pool(args.dst_device)
    receiver = create_receiver(backend, shape.layout(), pool)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    receiver.add_to_server(server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    sender = SenderProcess(backend, args.src_device, shape, SEED)
    rng, rows = random.Random(backend), []
    repeats = args.tcp_repeats if backend == "tcp" else args.repeats

    async def one(tokens: int) -> tuple[float, tuple[int, ...], tuple[int, ...]]:
        n = -(-tokens // shape.page_size)
        src = tuple(rng.sample(range(1, shape.num_pages), n))
        dst = tuple(rng.sample(range(1, shape.num_pages), n))
        t = Transfer(address, f"{backend}-{tokens}-{time.monotonic_ns()}", src, dst, tokens, deadline_s=600)
        pending = receiver.expect(t.transfer_id, list(dst), tokens, time.time_ns() + int(600e9))
        (outcome,) = await sender.run([t], timeout_s=900)
        result = await pending.wait()
        if not outcome.ok or result.state is not TransferState.DONE:
            raise RuntimeError(
                f"{backend} {tokens} tokens: {outcome.code} {outcome.message} / {result.state}"
            )
        return outcome.seconds, src, dst

    try:
        await one(args.tokens[0])  # warm-up: handshake, mapping (cuda_ipc), communicator (nccl)
        for tokens in args.tokens:
            runs = [await one(tokens) for _ in range(repeats)]
            _, src, dst = runs[-1]
            src_gpu = torch.tensor(src, device=args.dst_device)
            if not torch.equal(pool.kv_gpu[:, :, list(dst)], ref.index_select(2, src_gpu)):
                raise RuntimeError(f"{backend} {tokens} tokens: the received pages differ from the sent ones")
            num_bytes = len(src) * shape.page_size * shape.layout().bytes_per_token_layer * shape.num_layers
            ms = statistics.median(r[0] for r in runs) * 1e3
            floor = prefill_floor_ms(tokens, args.tflops)
            rows.append(dict(backend=backend, tokens=tokens, mib=num_bytes / 2**20, ms=ms, runs=len(runs),
                             gb_s=num_bytes / (ms / 1e3) / 1e9, prefill_floor_ms=floor, pct_of_prefill=100 * ms / floor,
                             bit_exact=True))  # fmt: skip
            print(
                f"  {backend:8s} {tokens:6d} tokens: {ms:9.2f} ms  {rows[-1]['gb_s']:7.2f} GB/s", flush=True
            )
    finally:
        sender.stop()
        await server.stop(0)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="cuda_ipc,nccl,tcp", help="comma-separated: tcp, cuda_ipc, nccl")
    p.add_argument("--tokens", default="1024,4096,16384,32768", help="prompt lengths")
    p.add_argument("--repeats", type=int, default=5, help="timed transfers per size (GPU backends)")
    p.add_argument("--tcp-repeats", type=int, default=1, help="timed transfers per size for tcp (slow)")
    p.add_argument("--src-device", default="cuda:0")
    p.add_argument("--dst-device", default="cuda:1")
    p.add_argument(
        "--tflops", type=float, default=None, help="bf16 GEMM TFLOP/s for the floor (default: measured)"
    )
    p.add_argument("--out", default=None, help="directory for kv_transfer_bench.json")
    args = p.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    backends = args.backends.split(",")
    args.tflops = args.tflops or gemm_tflops(args.src_device)
    m = QWEN3_8B
    shape = PoolShape(
        m["num_layers"], 2 * -(-max(args.tokens) // 16) + 1, 16, m["num_kv_heads"], m["head_dim"]
    )
    if args.dst_device.startswith("cuda"):
        torch.cuda.set_device(args.dst_device)
    ref_pool = shape.pool(args.dst_device)
    fill_pool(ref_pool, SEED)  # the sender's contents, rebuilt here (same seed)
    print(f"{device_name(args.src_device)} → {device_name(args.dst_device)}; "
          f"pool {tuple(ref_pool.kv_gpu.shape)} bf16 each side; bf16 GEMM {args.tflops:.0f} TFLOP/s", flush=True)  # fmt: skip
    rows: list[dict] = []
    failed = []
    for backend in backends:
        try:
            rows += asyncio.run(bench_backend(backend, args, shape, ref_pool.kv_gpu))
        except Exception as e:  # report and go on with the next backend
            failed.append(f"{backend}: {type(e).__name__}: {e}")
            print(f"FAILED {failed[-1]}", flush=True)
    header = "backend  | tokens |     MiB |  transfer ms |   GB/s | prefill floor ms | % of prefill floor | goal ≤5 %"
    lines = [header, "-" * len(header)]
    for r in rows:
        goal = "-" if r["backend"] == "tcp" else ("ok" if r["pct_of_prefill"] <= 5 else "MISSED")
        lines.append(f"{r['backend']:8s} | {r['tokens']:6d} | {r['mib']:7.0f} | {r['ms']:12.2f} | {r['gb_s']:6.2f} | "
                     f"{r['prefill_floor_ms']:16.1f} | {r['pct_of_prefill']:18.2f} | {goal}")  # fmt: skip
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = dict(src=device_name(args.src_device), dst=device_name(args.dst_device),
                    gemm_tflops=args.tflops, shape=vars(shape), command=" ".join(sys.argv), failed=failed)  # fmt: skip
        (out / "kv_transfer_bench.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
