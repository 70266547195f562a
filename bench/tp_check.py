"""Tensor parallelism on several GPUs of one host: symmetric-memory all-reduce, two-batch
overlap, TP=N logits against TP=1, decode step times.

    python -m bench.tp_check --tp 2 --model qwen3-8b --batch 64,256,512 --out runs

One process per GPU (NCCL, ``engine.distributed.init_tp``), each with its ``ModelRunner`` shard of a
random-weight bf16 model of the real shape (Triton attention, decode CUDA graphs; the collectives
run inside the captured graphs). Rank 0 also builds the whole model on GPU 0 (TP=1) as the
reference. Only the timed batch sizes are captured.

1. All-reduce latency of ``[rows, hidden]`` bf16, 20 per CUDA graph: NCCL, symmetric one-shot,
   symmetric two-shot (``engine.distributed.symmetric``): where the one-shot limit belongs.
2. For each variant in ``VARIANTS`` (NCCL or symmetric memory; with or without two-batch overlap):
   correctness — 4 fresh prompts prefilled in one packed step, then 16 greedy decode steps, fed the
   same tokens as TP=1 (TP=N's argmax); every step's logits compared (largest per-row relative
   error, argmax agreement) — and the decode step at ``--batch`` sizes and ``--ctx`` context: the
   graph replayed back to back (device time) and pipelined as the overlapped engine runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import socket
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from bench.runner_timing import (
    cuda_time_ms,
    gpu_step_ms,
    make_runner,
    model_config,
    overlap_step_ms,
    sequences,
)
from engine.distributed import destroy_tp, init_tp
from engine.graphs import decode_graphs
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence

KV_BYTES = 40 << 30  # per runner: TP=N shard holds bs 512 x 1k (8B); the TP=1 reference up to bs 256


def correctness(runner, ref, steps: int = 16) -> dict:
    ps = runner.cfg.page_size
    g = torch.Generator().manual_seed(0)
    seqs = [
        Sequence(
            f"c{i}", torch.randint(0, 150000, (n,), generator=g).tolist(), SamplingParams(), 0, n + steps + 1
        )
        for i, n in enumerate((100, 333, 700, 17))
    ]
    next_page, worst, agree, total = 1, 0.0, 0, 0
    lens = [s.num_tokens for s in seqs]
    for step in range(steps + 1):
        for seq, n in zip(seqs, lens, strict=True):
            while len(seq.pages) * ps < seq.num_computed + n:
                seq.pages.append(next_page)
                next_page += 1
        batch = ScheduledBatch(seqs, lens, is_decode=step > 0)
        got = runner.forward(runner.prepare(batch)).clone()  # [4, vocab]
        want = ref.forward(ref.prepare(batch)).clone() if ref is not None else got
        err = ((got.double() - want.double()).norm(dim=-1) / want.double().norm(dim=-1)).max().item()
        worst = max(worst, err)
        tokens = got.argmax(-1)
        agree += int((tokens == want.argmax(-1)).sum())
        total += len(seqs)
        for seq, n, t in zip(seqs, lens, tokens.tolist(), strict=True):
            seq.num_computed += n
            seq.token_ids.append(t)
        lens = [1] * len(seqs)
    return {"worst_row_rel_err": worst, "argmax_agreement": agree / total, "steps": steps + 1}


# (name, EngineConfig options): the all-reduce path and two-batch overlap (TBO) from 4 rows, i.e. for
# the correctness batch and every timed size. Piecewise prefill graphs only where named (capture time).
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("nccl", dict(symmetric_memory=False, tbo_min_batch=0, max_piecewise_tokens=0)),
    ("symm", dict(symmetric_memory=True, tbo_min_batch=0)),
    ("symm+tbo", dict(symmetric_memory=True, tbo_min_batch=4, max_piecewise_tokens=0)),
    ("nccl+tbo", dict(symmetric_memory=False, tbo_min_batch=4, max_piecewise_tokens=0)),
]
AR_ROWS = (1, 8, 64, 128, 256, 512, 1024, 2048)


def all_reduce_us(tp, hidden: int, device: str) -> list[dict]:
    """Per all-reduce of [rows, hidden] bf16, 20 back to back inside one CUDA graph (as the decode
    graphs issue them): plain NCCL, symmetric one-shot, symmetric two-shot."""
    dtype = torch.bfloat16
    sym = tp.with_symmetric_memory(max(AR_ROWS) * hidden * dtype.itemsize, dtype, torch.device(device))
    assert sym.symmetric is not None, "symmetric memory unavailable"
    rows_out = []
    for rows in AR_ROWS:
        x = torch.randn(rows, hidden, dtype=dtype, device=device)
        row: dict = {"rows": rows, "kib": rows * hidden * 2 >> 10}
        for name, limit in (("nccl", None), ("one_shot", 1 << 40), ("two_shot", 0)):
            if limit is not None:
                sym.symmetric.one_shot_max_bytes = limit
            group = tp if limit is None else sym
            group.all_reduce(x)  # warm-up outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(20):
                    group.all_reduce(x)
            row[f"{name}_us"] = cuda_time_ms(graph.replay, warmup=3, reps=30) * 1e3 / 20
            del graph
        rows_out.append(row)
    return rows_out


def rank_main(rank: int, args: argparse.Namespace, init_method: str, out: str) -> None:
    try:
        device = f"cuda:{rank}"
        tp = init_tp(rank, args.tp, init_method, device=device)
        cfg = model_config(args.model, max(args.ctx, 1024) + 64)
        max_bs = max(args.batch)
        # Capture only the sizes timed (and 4, the correctness batch): not every size up to 512.
        sizes = sorted({4, *args.batch})
        decode_graphs.graph_batch_sizes = lambda limit: [s for s in sizes if s <= limit]
        result: dict = {"gpu": torch.cuda.get_device_name(), "tp": args.tp, "model": args.model,
                        "ctx": args.ctx, "all_reduce": all_reduce_us(tp, cfg.hidden_size, device)}  # fmt: skip
        if rank == 0:
            print(json.dumps(result["all_reduce"], indent=1), flush=True)
        ref = None
        if rank == 0:
            ref = make_runner(cfg, 2048, "triton", True, max_bs, device=device, kv_cache_bytes=KV_BYTES,
                              max_piecewise_tokens=0)  # fmt: skip
        decode: dict[int, dict] = {bs: {"batch": bs} for bs in args.batch}
        if ref is not None:
            ref.kv_pool.kv_gpu.normal_(generator=torch.Generator(device).manual_seed(1))
            for bs in args.batch:
                seqs = sequences(ref, bs, args.ctx, args.ctx - 1)
                if bs * -(-args.ctx // ref.cfg.page_size) < ref.num_pages:
                    decode[bs]["tp1_ms"] = gpu_step_ms(ref, seqs, reps=20)
        result["correctness"] = {}
        for name, options in VARIANTS:
            runner = make_runner(cfg, 2048, "triton", True, max_bs, device=device, tp=runner_tp(tp),
                                 kv_cache_bytes=KV_BYTES, **options)  # fmt: skip
            result["correctness"][name] = correctness(runner, ref)
            for bs in args.batch:
                seqs = sequences(runner, bs, args.ctx, args.ctx - 1)
                decode[bs][f"{name}_ms"] = gpu_step_ms(runner, seqs, reps=20)
                decode[bs][f"{name}_host_ms"] = overlap_step_ms(runner, seqs, reps=20)
            if rank == 0:
                print(name, result["correctness"][name], [decode[bs] for bs in args.batch], flush=True)
            del runner
            gc.collect()
            torch.cuda.empty_cache()
        result["decode"] = list(decode.values())
        if rank == 0:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "tp_check.json").write_text(json.dumps(result, indent=1))
            print(json.dumps(result, indent=1), flush=True)
        del ref, tp
        gc.collect()
        destroy_tp()
    except BaseException:
        traceback.print_exc()
        os._exit(1)


def runner_tp(tp):
    """The plain group: the runner adds its own symmetric buffers when its config asks for them."""
    return dataclasses.replace(tp, symmetric=None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--model", default="qwen3-8b")
    p.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[64, 256, 512])
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--out", default=os.environ.get("OUT", "runs"))
    p.add_argument("--no-graphs", action="store_true", help="eager steps (no decode / piecewise graphs)")
    args = p.parse_args()
    assert torch.cuda.device_count() >= args.tp, f"--tp {args.tp} needs {args.tp} GPUs"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(rank_main, args=(args, f"tcp://127.0.0.1:{port}", args.out), nprocs=args.tp,
                       start_method="spawn")  # fmt: skip


if __name__ == "__main__":
    main()
