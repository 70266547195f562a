"""Tensor parallelism on several GPUs of one host (#7): TP=N logits against TP=1, decode step times.

    python bench/tp_check.py --tp 2 --model qwen3-8b --out runs

One process per GPU (NCCL, ``engine.distributed.init_tp``), each with its ``ModelRunner`` shard of a
random-weight bf16 model of the real shape (Triton attention, decode CUDA graphs, piecewise extend
graphs: the collectives run inside the captured graphs). Rank 0 also builds the whole model on
GPU 0 (TP=1) as the reference.

1. Correctness: 4 fresh prompts prefilled in one packed step (piecewise graphs), then 16 greedy
   decode steps (decode graphs), both runners fed the same tokens (TP=N's argmax); every step's
   logits compared: largest per-row relative error and argmax agreement.
2. Decode step time at ``--batch`` sizes and ``--ctx`` context, graphs pipelined as the overlapped
   engine runs them, TP=N against TP=1 (no two-batch overlap yet).
3. All-reduce latency for the decode activations ``[batch, hidden]`` bf16 (plain NCCL).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from bench.runner_timing import cuda_time_ms, make_runner, model_config, overlap_step_ms, sequences
from engine.distributed import destroy_tp, init_tp
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


def rank_main(rank: int, args: argparse.Namespace, init_method: str, out: str) -> None:
    try:
        device = f"cuda:{rank}"
        tp = init_tp(rank, args.tp, init_method, device=device)
        cfg = model_config(args.model, max(args.ctx, 1024) + 64)
        max_bs = max(args.batch)
        graphs = not args.no_graphs
        runner = make_runner(
            cfg, 2048, "triton", graphs, max_bs, device=device, tp=tp, kv_cache_bytes=KV_BYTES
        )
        ref = None
        if rank == 0:
            ref = make_runner(cfg, 2048, "triton", graphs, max_bs, device=device, kv_cache_bytes=KV_BYTES)
        result: dict = {
            "gpu": torch.cuda.get_device_name(),
            "tp": args.tp,
            "model": args.model,
            "graphs": graphs,
        }
        result["correctness"] = correctness(runner, ref)
        runner.kv_pool.kv_gpu.normal_()
        rows = []
        for bs in args.batch:
            seqs = sequences(runner, bs, args.ctx, args.ctx - 1)
            ms_tp = overlap_step_ms(runner, seqs, reps=40)
            fits = ref is not None and bs * -(-args.ctx // ref.cfg.page_size) < ref.num_pages
            ms_one = overlap_step_ms(ref, seqs, reps=40) if ref is not None and fits else None
            x = torch.randn(bs, cfg.hidden_size, dtype=torch.bfloat16, device=device)
            ar_us = cuda_time_ms(lambda x=x, g=tp: g.all_reduce(x), warmup=5, reps=50) * 1e3
            rows.append({"batch": bs, "ctx": args.ctx, f"tp{args.tp}_ms": ms_tp, "tp1_ms": ms_one,
                         "all_reduce_us": ar_us})  # fmt: skip
            if rank == 0:
                print(rows[-1], flush=True)
        result["decode"] = rows
        if rank == 0:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "tp_check.json").write_text(json.dumps(result, indent=1))
            print(json.dumps(result, indent=1), flush=True)
        del runner, ref, tp
        gc.collect()
        destroy_tp()
    except BaseException:
        traceback.print_exc()
        os._exit(1)


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
