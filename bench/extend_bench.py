"""One layer's EXTEND attention: the triton backend's FA2 varlen path vs torch_native's per-sequence loop.

    python -m bench.extend_bench --models qwen3-8b,qwen3-0.6b --reps 20 --out runs

Per model (attention shapes only: query heads, KV heads, head_dim; bf16) and batch shape, the time of
one layer's ``backend.forward`` (KV store + attention) on a random pool, with CUDA events, median of
``--reps`` after warm-up; "prep ms" is the varlen path's per-step metadata (``prepare``, shared by
every layer). TFLOP/s counts causal attention only: ``4 * num_heads * head_dim`` per (query, visible
key) pair. Batches: one fresh prompt of 512 / 2k / 8k tokens; 8 prompts of 1k new tokens over 1k
cached each; one 4k chunk over 4k cached; 64 fresh prompts of 64 tokens. The gather budget
(``max_gather_tokens``, the engine's ``max_num_batched_tokens``) defaults to the batch's new-token
count, the smallest step budget that holds it. The ``triton`` backend sends a lone fresh prompt
through SDPA's dense causal kernel (cuDNN on Hopper), everything else through FA2 varlen.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch

from bench.runner_timing import cuda_time_ms, write_results
from engine.attention.base import AttentionBackend, ForwardBatch, ForwardMode
from engine.attention.torch_native import TorchNativeBackend
from engine.kvcache.page_pool import KVPagePool

SHAPES = {"qwen3-8b": (32, 8, 128), "qwen3-0.6b": (16, 8, 128)}  # num_heads, num_kv_heads, head_dim
CASES = {  # name: (prefix_lens, extend_lens)
    "1x512": ([0], [512]),
    "1x2k": ([0], [2048]),
    "1x8k": ([0], [8192]),
    "8x1k +1k prefix": ([1024] * 8, [1024] * 8),
    "1x4k +4k prefix": ([4096], [4096]),  # an 8k prompt's second chunk at a 4k step budget
    "64x64": ([0] * 64, [64] * 64),
}


@dataclass
class Row:
    model: str
    case: str
    num_tokens: int
    num_keys: int
    varlen_ms: float
    native_ms: float
    prepare_ms: float
    groups: int
    tflop: float  # causal attention FLOPs of the batch, in 1e12

    @property
    def varlen_tflops(self) -> float:
        return self.tflop / (self.varlen_ms / 1e3)

    @property
    def native_tflops(self) -> float:
        return self.tflop / (self.native_ms / 1e3)


def causal_flops(prefix: list[int], ext: list[int], num_heads: int, head_dim: int) -> float:
    pairs = sum(e * p + e * (e + 1) // 2 for p, e in zip(prefix, ext, strict=True))
    return 4.0 * num_heads * head_dim * pairs


def make_batch(prefix, ext, page_size, num_kv_heads, head_dim, backend: AttentionBackend) -> ForwardBatch:
    """A one-layer random pool holding the batch's sequences on consecutive pages after page 0."""
    seq_lens = [p + e for p, e in zip(prefix, ext, strict=True)]
    counts = [-(-n // page_size) for n in seq_lens]
    pool = KVPagePool(1, sum(counts) + 1, page_size, num_kv_heads, head_dim, torch.bfloat16, "cuda")
    pool.kv_gpu.normal_()
    rows, first = [], 1
    for c in counts:
        rows.append(list(range(first, first + c)))
        first += c
    width = max(counts)
    slots = [
        row[t // page_size] * page_size + t % page_size
        for row, p, n in zip(rows, prefix, seq_lens, strict=True)
        for t in range(p, n)
    ]
    num_tokens = sum(ext)
    zeros = torch.zeros(num_tokens, dtype=torch.int64, device="cuda")
    return ForwardBatch(
        mode=ForwardMode.EXTEND,
        input_ids=zeros,
        positions=zeros,
        out_cache_loc=torch.tensor(slots, device="cuda"),
        page_table=torch.tensor([r + [0] * (width - len(r)) for r in rows], device="cuda"),
        seq_lens=torch.tensor(seq_lens, device="cuda"),
        logits_indices=torch.zeros(len(ext), dtype=torch.int64, device="cuda"),
        seq_lens_cpu=seq_lens,
        extend_lens_cpu=list(ext),
        kv_pool=pool,
        attn_backend=backend,
    )


@torch.inference_mode()
def bench_case(model: str, case: str, args: argparse.Namespace) -> Row:
    from engine.attention.triton_backend import TritonBackend
    from engine.attention.varlen_extend import ExtendMetadata

    num_heads, num_kv_heads, head_dim = SHAPES[model]
    prefix, ext = CASES[case]
    num_tokens = sum(ext)
    budget = args.max_gather_tokens or num_tokens
    layer = SimpleNamespace(layer_id=0, scaling=head_dim**-0.5)
    # strided views of one packed projection, as the attention layer passes them
    qkv = torch.randn(
        num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device="cuda", dtype=torch.bfloat16
    )
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)
    k = k.view(num_tokens, num_kv_heads, head_dim)
    v = v.view(num_tokens, num_kv_heads, head_dim)
    ms = {}
    for name, backend in (
        ("varlen", TritonBackend(max_gather_tokens=budget, device=torch.device("cuda"))),
        ("native", TorchNativeBackend(max_gather_tokens=budget)),
    ):
        batch = make_batch(prefix, ext, args.page_size, num_kv_heads, head_dim, backend)
        backend.prepare(batch)
        if name == "varlen":
            meta = batch.attn_metadata
            assert isinstance(meta, ExtendMetadata), (
                "varlen_attn unavailable: this would time torch_native twice"
            )
            groups = len(meta.groups)
            ms["prepare"] = cuda_time_ms(lambda b=backend, fb=batch: b.prepare(fb), args.warmup, args.reps)

        def step(b=backend, fb=batch):  # what a layer does: store the new K/V, then attend
            fb.kv_pool.store(0, fb.out_cache_loc, k, v)
            return b.forward(layer, q, k, v, fb)

        ms[name] = cuda_time_ms(step, args.warmup, args.reps)
        del batch
    return Row(
        model,
        case,
        num_tokens,
        sum(prefix) + num_tokens,
        ms["varlen"],
        ms["native"],
        ms["prepare"],
        groups,
        causal_flops(prefix, ext, num_heads, head_dim) / 1e12,
    )


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| model | batch | tokens | keys | groups | varlen ms | TFLOP/s | torch_native ms | TFLOP/s | speed-up | prep ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.case} | {r.num_tokens} | {r.num_keys} | {r.groups} | {r.varlen_ms:.3f} | "
            f"{r.varlen_tflops:.0f} | {r.native_ms:.3f} | {r.native_tflops:.0f} | "
            f"{r.native_ms / r.varlen_ms:.1f}x | {r.prepare_ms:.3f} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3-8b,qwen3-0.6b")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-gather-tokens", type=int, default=0, help="0: the batch's new-token count")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=os.environ.get("OUT", "runs"), help="folder for extend_bench.{md,json}")
    args = p.parse_args()
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; known: {list(CASES)}")

    gpu = torch.cuda.get_device_name()
    rows = []
    for model in args.models.split(","):
        for case in cases:
            rows.append(bench_case(model, case, args))
            print(rows[-1], flush=True)
            torch.cuda.empty_cache()
    lines = [
        f"GPU: {gpu}; torch {torch.__version__}; bf16; page_size {args.page_size}; one layer, median of {args.reps}",
        "",
        *table(rows),
    ]
    print("\n".join(lines))
    write_results(
        args.out,
        "extend_bench",
        lines,
        {
            "gpu": gpu,
            "torch": torch.__version__,
            "page_size": args.page_size,
            "rows": [
                asdict(r) | {"varlen_tflops": r.varlen_tflops, "native_tflops": r.native_tflops} for r in rows
            ],
        },
    )


if __name__ == "__main__":
    main()
