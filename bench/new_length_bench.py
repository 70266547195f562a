"""Lone prompts of lengths the process has not seen before, on a GPU: the first prefill
of each new length against a repeat of it.

    python -m bench.new_length_bench --models qwen3-0.6b,qwen3-8b

A lone fresh prompt of ``varlen_extend.SDPA_MIN_TOKENS`` or more goes through cuDNN's dense causal
path, which builds an execution plan per sequence length (45-72 ms of host time on an H100 host).
The engine builds the plans of the lengths that path takes at startup and sends the queries past the
last ``DENSE_LENGTH_STEP`` multiple through FA2, so a new length should cost what a repeat costs.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from bench.runner_timing import make_runner, model_config, run_step, sequences, write_results
from engine.scheduler import ScheduledBatch


def step_wall_ms(runner, length: int) -> float:
    """Wall time of one prefill step of a lone ``length``-token prompt, the engine's path (graphs
    on), from launch to its sampled token on the host."""
    batch = ScheduledBatch(sequences(runner, 1, length, 0), [length], is_decode=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    run_step(runner, batch, graphs=True)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3-0.6b,qwen3-8b")
    p.add_argument("--lengths", default="4097,4600,5001,6100,7001,7999")
    p.add_argument("--max-tokens", type=int, default=8192, help="the step budget (chunk size)")
    p.add_argument(
        "--step-thread",
        action="store_true",
        help="step from a thread of its own, bound with ModelRunner.bind_thread as AsyncEngine's is "
        "(torch caches cuDNN's plans per thread)",
    )
    p.add_argument("--out", default=os.environ.get("OUT", "runs"))
    args = p.parse_args()
    lines = ["| model | prompt tokens | first ms | repeat ms |", "|---|---|---|---|"]
    rows = []
    for name in args.models.split(","):
        start = time.perf_counter()
        runner = make_runner(model_config(name, 4 * args.max_tokens), args.max_tokens, "triton", True, 256)
        print(f"{name}: engine start {time.perf_counter() - start:.1f} s", flush=True)
        thread = ThreadPoolExecutor(1, initializer=runner.bind_thread) if args.step_thread else None

        def step(length: int, runner=runner, thread=thread) -> float:
            return (
                thread.submit(step_wall_ms, runner, length).result()
                if thread
                else step_wall_ms(runner, length)
            )

        step(args.max_tokens)  # the first step of all pays for lazy set-up: not timed
        for length in map(int, args.lengths.split(",")):
            first, repeat = step(length), step(length)
            rows.append({"model": name, "tokens": length, "first_ms": first, "repeat_ms": repeat})
            lines.append(f"| {name} | {length} | {first:.2f} | {repeat:.2f} |")
            print(lines[-1], flush=True)
        if thread is not None:
            thread.shutdown()
        del runner
        gc.collect()  # graph runners sit in reference cycles
        torch.cuda.empty_cache()
    write_results(args.out, "new_length_bench", lines, rows)


if __name__ == "__main__":
    main()
