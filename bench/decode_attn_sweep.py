"""Launch-knob sweep for the Triton paged decode attention kernel, on the GPU.

    python -m bench.decode_attn_sweep --out runs

For Qwen3-8B and Qwen3-0.6B attention shapes (bf16, page size 16, pages shuffled through the pool),
batch sizes 1/8/64/256 and contexts 1k/4k, times every combination of keys per tile (``block_n``),
warps, pipeline stages and KV split count (the engine's choice, half and twice it), checks each
against the default configuration's output, and prints the achieved KV bandwidth next to the
default's. CUDA events, 10 launches per sample, median of ``--reps`` samples after warm-up.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from bench.runner_timing import cuda_time_ms, write_results
from engine.attention.triton_decode import BLOCK_N, num_splits_for, paged_decode_attention

SHAPES = {"qwen3-8b": (32, 8, 128), "qwen3-0.6b": (16, 8, 128)}  # q heads, kv heads, head_dim
PAGE = 16


def timed_ms(fn, reps: int) -> float:
    """Per launch: 10 launches per sample (one is too short to time alone)."""
    return cuda_time_ms(lambda: [fn() for _ in range(10)], warmup=1, reps=reps) / 10


def sweep_one(model: str, bs: int, ctx: int, reps: int, num_sms: int) -> dict:
    num_heads, num_kv_heads, head_dim = SHAPES[model]
    g = torch.Generator(device="cuda").manual_seed(bs * 7 + ctx)
    pages_per_seq = -(-ctx // PAGE)
    num_pages = bs * pages_per_seq + 1
    shape = (num_pages, PAGE, num_kv_heads, head_dim)
    k_pages = torch.randn(shape, device="cuda", generator=g, dtype=torch.bfloat16)
    v_pages = torch.randn(shape, device="cuda", generator=g, dtype=torch.bfloat16)
    page_table = (torch.randperm(num_pages - 1, device="cuda", generator=g) + 1).view(bs, pages_per_seq)
    seq_lens = torch.full((bs,), ctx, device="cuda")
    q = torch.randn(bs, num_heads, head_dim, device="cuda", generator=g, dtype=torch.bfloat16)
    scale = head_dim**-0.5
    kv_bytes = 2 * bs * ctx * num_kv_heads * head_dim * 2
    base_splits = num_splits_for(bs, num_kv_heads, num_sms, ctx)
    default = paged_decode_attention(q, k_pages, v_pages, page_table, seq_lens, scale, base_splits)
    results = []
    splits = sorted({max(1, base_splits // 2), base_splits, min(16, base_splits * 2)})
    for block_n, warps, stages, num_splits in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4), splits):

        def run(block_n=block_n, warps=warps, stages=stages, num_splits=num_splits):
            return paged_decode_attention(
                q, k_pages, v_pages, page_table, seq_lens, scale, num_splits,
                block_n=block_n, num_warps=warps, num_stages=stages,
            )  # fmt: skip

        try:
            err = ((run().float() - default.float()).abs().max() / default.float().abs().max()).item()
            ms = timed_ms(run, reps)
        except Exception as e:  # a configuration Triton cannot compile (e.g. out of shared memory)
            print(f"  skip block_n={block_n} warps={warps} stages={stages}: {type(e).__name__}", flush=True)
            continue
        assert err < 2e-2, (
            f"block_n={block_n} warps={warps} stages={stages} splits={num_splits}: rel err {err}"
        )
        results.append(dict(block_n=block_n, warps=warps, stages=stages, splits=num_splits, ms=ms,
                            tb_s=kv_bytes / ms / 1e9))  # fmt: skip
    best = min(results, key=lambda r: r["ms"])
    base = next(
        r for r in results
        if (r["block_n"], r["warps"], r["stages"], r["splits"]) == (BLOCK_N, 4, 2, base_splits)
    )  # fmt: skip
    return dict(model=model, bs=bs, ctx=ctx, default=base, best=best, all=results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3-8b,qwen3-0.6b")
    p.add_argument("--batch", default="1,8,64,256")
    p.add_argument("--ctx", default="1024,4096")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default="runs")
    args = p.parse_args()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    lines = [
        f"GPU: {torch.cuda.get_device_name()}; bf16, page size {PAGE}",
        "",
        "| model | batch | ctx | default ms | default TB/s | best ms | best TB/s | best (block_n, warps, stages, splits) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, bs, ctx in itertools.product(
        args.models.split(","), map(int, args.batch.split(",")), map(int, args.ctx.split(","))
    ):
        r = sweep_one(model, bs, ctx, args.reps, num_sms)
        rows.append(r)
        d, b = r["default"], r["best"]
        lines.append(
            f"| {model} | {bs} | {ctx} | {d['ms']:.4f} | {d['tb_s']:.2f} | {b['ms']:.4f} | {b['tb_s']:.2f} "
            f"| {b['block_n']}, {b['warps']}, {b['stages']}, {b['splits']} |"
        )
        print(lines[-1], flush=True)
    print("\n".join(lines))
    write_results(args.out, "decode_attn_sweep", lines, rows)


if __name__ == "__main__":
    main()
