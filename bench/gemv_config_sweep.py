"""The batch-1 GEMV's launch parameters chosen by what they are for: the decode step's time.

    python -m bench.gemv_config_sweep --models qwen3-8b,qwen3-0.6b [--ctx 1024] [--out runs]

Per model (random bf16 weights of the real shape, Triton attention, decode CUDA graphs) the bs-1
decode graph is captured with ``triton_gemv.gemv_config``'s configs ("base"), then once per
candidate config of one projection shape (qkv, o, gate_up, down, LM head; every other shape keeps
its base config), and timed as the graph replayed back to back (``gpu_step_ms``, the best of two
timings). Last, every shape's best candidate together, and the base again (the run-to-run spread).
``gemv_bench.py`` times one projection in isolation; its numbers move by 2-3 µs between runs and
miss what a kernel does to its neighbours, which the step includes. Each candidate costs one
capture: ~2-3 s per candidate on an H100, 15-18 candidates per shape.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os

import torch
import triton

from bench.gemv_bench import gemv_shape, projections
from bench.runner_timing import SHAPES, gpu_step_ms, make_runner, model_config, sequences, write_results
from engine.layers import triton_gemv
from engine.layers.triton_gemv import GemvConfig

Shape = tuple[int, int, bool]  # (n, k, gated) as gemv_config sees them


def candidates(k: int) -> list[GemvConfig]:
    """block_n x block_k (up to the row's padded length) x warps."""
    block_ks = [bk for bk in (1024, 2048, 4096) if bk <= max(1024, triton.next_power_of_2(k))]
    return [GemvConfig(*c) for c in itertools.product((1, 2, 4), block_ks, (4, 8))]


def sweep(model: str, ctx: int, lines: list[str]) -> dict:
    shapes: list[Shape] = [
        gemv_shape(n, k, kind) for _, n, k, kind in projections(SHAPES[model], lm_head=True)
    ]
    runner = make_runner(model_config(model, 2 * ctx), 2048, "triton", True, 1, max_graph_batch_size=1)
    seqs = sequences(runner, 1, ctx, ctx - 1)
    chosen: dict[Shape, GemvConfig] = {}
    default = triton_gemv.gemv_config

    def config(rows: int, n: int, k: int, gated: bool, pdl: bool = False) -> GemvConfig:
        cfg = chosen.get((n, k, gated))
        return cfg._replace(pdl=pdl) if cfg is not None else default(rows, n, k, gated, pdl)

    def step_ms(configs: dict[Shape, GemvConfig]) -> float:
        chosen.clear()
        chosen.update(configs)
        assert runner.graphs is not None
        runner.graphs.capture()
        return min(gpu_step_ms(runner, seqs, 30) for _ in range(2))

    triton_gemv.gemv_config = config  # type: ignore[assignment]
    try:
        base = step_ms({})
        lines.append(f"| {model} | base (gemv_config's rule) | | {base:.4f} | |")
        best: dict[Shape, tuple[GemvConfig, float]] = {}
        for shape in shapes:
            for cfg in candidates(shape[1]):
                ms = step_ms({shape: cfg})
                if ms < best.get(shape, (cfg, base))[1]:
                    best[shape] = (cfg, ms)
            cfg, ms = best.get(shape, (default(1, *shape), base))
            line = f"| {model} | {shape} | {'/'.join(map(str, cfg[:3]))} | {ms:.4f} | {ms - base:+.4f} |"
            lines.append(line)
            print(line, flush=True)
        combined = step_ms({shape: cfg for shape, (cfg, _) in best.items()})
        again = step_ms({})
    finally:
        triton_gemv.gemv_config = default  # type: ignore[assignment]
    lines.append(f"| {model} | every best together | | {combined:.4f} | {combined - base:+.4f} |")
    lines.append(f"| {model} | base again | | {again:.4f} | {again - base:+.4f} |")
    print(*lines[-2:], sep="\n", flush=True)
    return dict(
        base=base,
        best={str(s): dict(config=c._asdict(), ms=ms) for s, (c, ms) in best.items()},
        combined=combined,
        base_again=again,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3-8b,qwen3-0.6b")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--out", default=os.environ.get("OUT", "runs"))
    args = p.parse_args()
    lines = [
        f"GPU {torch.cuda.get_device_name()}, bs-1 decode graph, ctx {args.ctx}, gpu ms",
        "| model | shape (n, k, gated) | best block_n/block_k/warps | step ms | vs base |",
        "|---|---|---|---|---|",
    ]
    results = {}
    for model in args.models.split(","):
        results[model] = sweep(model, args.ctx, lines)
        gc.collect()  # the model's runner, before the next one's weights
        torch.cuda.empty_cache()
    write_results(args.out, "gemv_config_sweep", lines, results)


if __name__ == "__main__":
    main()
