"""Context-parallel prefill on two GPUs of one host: cp=2 logits against cp=1, prefill times.

    python -m bench.cp_check --model qwen3-8b --tokens 4096,8192,16384,32768 --out runs

Two processes (NCCL, ``engine.distributed.init_tp``), each a CP rank with the whole random-weight
bf16 model of the real shape (Triton attention; the per-layer K/V all-gather through symmetric
memory, or NCCL with ``--no-symmetric-memory``). Rank 0 also builds a one-GPU runner (cp=1) as the
reference. For each prompt length: one fresh prompt prefilled in a single step on both; the last
token's logits compared (relative error, argmax) and the step timed (wall clock around the step,
CUDA-synchronized, median of ``--reps``; both ranks run the cp=2 step together).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from bench.runner_timing import make_runner, model_config
from engine.distributed import destroy_tp, init_tp
from engine.distributed.context_parallel import CPGroup
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence

KV_BYTES = 12 << 30


def prompt_batch(runner, n: int, seed: int) -> ScheduledBatch:
    g = torch.Generator().manual_seed(seed)
    seq = Sequence("p", torch.randint(0, 150000, (n,), generator=g).tolist(), SamplingParams(), 0, n + 1)
    seq.pages = list(range(1, 1 + -(-n // runner.cfg.page_size)))
    assert seq.pages[-1] < runner.num_pages, "KV pool too small for this prompt"
    return ScheduledBatch([seq], [n], is_decode=False)


def timed_step(runner, batch: ScheduledBatch, reps: int) -> tuple[torch.Tensor, float]:
    times, logits = [], None
    for _ in range(reps + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        logits = runner.forward(runner.prepare(batch))
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    assert logits is not None
    return logits.float().clone(), statistics.median(times[1:])


def rank_main(rank: int, args: argparse.Namespace, init_method: str) -> None:
    try:
        device = f"cuda:{rank}"
        group = init_tp(rank, 2, init_method, device=device)
        cfg = model_config(args.model, max(args.tokens) + 64)
        max_tokens = max(args.tokens)
        opts: dict[str, Any] = dict(
            symmetric_memory=not args.no_symmetric_memory, cp_min_tokens=128, max_piecewise_tokens=0
        )
        runner = make_runner(cfg, max_tokens, "triton", False, 8, device=device, kv_cache_bytes=KV_BYTES,
                             cp=CPGroup.of(group), **opts)  # fmt: skip
        ref = None
        if rank == 0:
            ref = make_runner(cfg, max_tokens, "triton", False, 8, device=device, kv_cache_bytes=KV_BYTES,
                              max_piecewise_tokens=0)  # fmt: skip
        rows = []
        for n in args.tokens:
            batch = prompt_batch(runner, n, seed=n)
            got, cp_ms = timed_step(runner, batch, args.reps)
            row: dict = {"tokens": n, "cp2_ms": cp_ms, "split": runner.num_split_steps > 0}
            if ref is not None:
                want, one_ms = timed_step(ref, prompt_batch(ref, n, seed=n), args.reps)
                err = ((got.double() - want.double()).norm() / want.double().norm()).item()
                row |= {"cp1_ms": one_ms, "speedup": one_ms / cp_ms, "logits_rel_err": err,
                        "argmax_equal": bool((got.argmax(-1) == want.argmax(-1)).all())}  # fmt: skip
                print(row, flush=True)
            rows.append(row)
        if rank == 0:
            result = {"gpu": torch.cuda.get_device_name(), "model": args.model,
                      "symmetric_memory": not args.no_symmetric_memory, "rows": rows}  # fmt: skip
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "cp_check.json").write_text(json.dumps(result, indent=1))
            print(json.dumps(result, indent=1), flush=True)
        del runner, ref, group
        gc.collect()
        destroy_tp()
    except BaseException:
        traceback.print_exc()
        os._exit(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-8b")
    p.add_argument(
        "--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 8192, 16384, 32768]
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-symmetric-memory", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT", "runs"))
    args = p.parse_args()
    assert torch.cuda.device_count() >= 2, "cp=2 needs 2 GPUs"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(rank_main, args=(args, f"tcp://127.0.0.1:{port}"), nprocs=2, start_method="spawn")


if __name__ == "__main__":
    main()
