"""The decode layer's projections at a few rows: the fused Triton GEMV (``engine.layers.triton_gemv``)
against what it replaces (cuBLAS ``F.linear`` plus the separate norm / SiLU·up kernels), with the
read bandwidth each reaches, and a sweep of the GEMV's launch parameters.

    python -m bench.gemv_bench --models qwen3-0.6b,qwen3-8b --rows 1,2,4,8 [--read-floor]
        [--pdl] [--lm-head] [--sweep] [--out runs]

Per model the four projections of a layer as the decode step runs them: input norm (+ residual add)
→ qkv; o_proj; post-attention norm (+ residual add) → gate/up → SiLU·up; down_proj. Each is timed
inside one CUDA graph that runs it over enough distinct weight copies (≥ 256 MB together) that no
copy is still in the 50 MB L2 when its turn comes again, as in a real step. "GB/s" is the weight
bytes over the time; the copy bandwidth of the same GPU is printed first (read + write counted).
``--read-floor`` adds the fastest pure read (a sum) of the same weights, timed the same way: how fast
these bytes can stream at all. ``--pdl`` adds the default config launched as a programmatic dependent
(each call may start while the previous one finishes, as consecutive projections would).
``--lm-head`` adds the LM head. ``--sweep`` adds the best launch config as block_n/block_k/warps.
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch
import triton
import triton.language as tl

from bench.runner_timing import SHAPES, VOCAB, cuda_time_ms, measure_ceilings, write_results
from engine.layers import triton_gemv
from engine.layers.kernels import LayerOps
from engine.layers.triton_gemv import GemvConfig, NormIn
from engine.layers.triton_ops import TritonOps

L2_DEFEAT_BYTES = 256 << 20


class CublasProjections(TritonOps):
    """The decode step before the GEMV: the fused norm / SiLU·up kernels around cuBLAS."""

    linear = LayerOps.linear
    norm_project = LayerOps.norm_project


def projections(shape: dict, lm_head: bool = False) -> list[tuple[str, int, int, str]]:
    """(name, N, K, kind) of one layer (and the LM head); N counts both halves for the gated gate/up."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    q, kv = shape["num_heads"] * shape["head_dim"], shape["num_kv_heads"] * shape["head_dim"]
    head = [("lm_head", VOCAB, hidden, "plain")] if lm_head else []
    return [
        ("qkv", q + 2 * kv, hidden, "norm"),
        ("o", hidden, q, "plain"),
        ("gate_up", 2 * inter, hidden, "gated"),
        ("down", hidden, inter, "plain"),
        *head,
    ]


def gemv_shape(n: int, k: int, kind: str) -> tuple[int, int, bool]:
    """(n, k, gated) as ``triton_gemv.gemv_config`` takes them: a gated weight's N counts both halves."""
    gated = kind == "gated"
    return (n // 2 if gated else n, k, gated)


def make_call(ops: LayerOps, kind: str, x, residual, norm_w, config: GemvConfig | None = None):
    """A closure over (weight) running the projection the decode layer runs: through ``ops``
    (torch: separate norm / cuBLAS / SiLU kernels) or, with ``config``, the GEMV with that config."""
    if config is not None:
        norm = NormIn(norm_w, 1e-6, residual) if kind != "plain" else None
        return lambda w: triton_gemv.gemv(x, w, norm=norm, gated=kind == "gated", config=config)
    if kind == "plain":
        return lambda w: ops.linear(x, w)
    if kind == "gated":
        return lambda w: ops.norm_gate_up(x, residual, norm_w, 1e-6, w)
    return lambda w: ops.norm_linear(x, residual, norm_w, 1e-6, w)


def time_us(call, weights: list[torch.Tensor], reps: int = 20) -> float:
    """µs per call, the calls over ``weights`` replayed from one CUDA graph."""
    for w in weights[:2]:
        call(w)  # compile, warm the allocator
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            call(w)
    ms = cuda_time_ms(graph.replay, warmup=2, reps=reps)
    del graph
    return ms * 1e3 / len(weights)


def sweep_configs(rows: int) -> list[GemvConfig]:
    """The launch parameters ``--sweep`` tries (block_n x block_k x warps): a step's [rows, BN, BK]
    product of at most 16k elements (more spills registers)."""
    block_ks = (1024, 2048, 4096) if rows == 1 else (256, 512, 1024, 2048)
    configs = [GemvConfig(*c) for c in itertools.product((1, 2, 4), block_ks, (4, 8))]
    return [c for c in configs if triton.next_power_of_2(rows) * c.block_n * c.block_k <= 16384]


@triton.jit
def _read_kernel(W, Out, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Program p sums elements [p * CHUNK, +CHUNK) of ``W``: a read of the bytes and nothing else."""
    offs = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, CHUNK, BLOCK):
        acc += tl.load(W + offs + i).to(tl.float32)
    tl.store(Out + tl.program_id(0), tl.sum(acc))


def read_floor_us(weights: list[torch.Tensor]) -> float:
    """The fastest pure read of one weight (µs): torch's sum and a streaming Triton sum over a few
    chunk / block / warp sizes, timed as the projections are (one graph over all copies)."""
    numel = weights[0].numel()
    out = torch.empty(numel // 1024, device=weights[0].device, dtype=torch.float32)
    best = time_us(lambda w: w.sum(dtype=torch.float32), weights)
    for chunk, block, warps in itertools.product((1024, 4096, 16384), (1024, 2048), (4, 8)):
        if numel % chunk or block > chunk:
            continue

        def read(w, chunk=chunk, block=block, warps=warps):
            _read_kernel[(numel // chunk,)](w, out, CHUNK=chunk, BLOCK=block, num_warps=warps)

        best = min(best, time_us(read, weights))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3-0.6b,qwen3-8b")
    p.add_argument("--rows", default="1,2,4,8")
    p.add_argument("--sweep", action="store_true", help="also sweep the GEMV's launch parameters")
    p.add_argument("--read-floor", action="store_true", help="also time a pure read of each weight")
    p.add_argument("--pdl", action="store_true", help="also the default config launched with PDL")
    p.add_argument("--lm-head", action="store_true", help="also the LM head (vocab x hidden, one matrix)")
    p.add_argument("--out", default="runs")
    args = p.parse_args()
    bw, _ = measure_ceilings()
    lines = [f"GPU {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e9:.0f} GB/s (read + write)"]
    print(lines[0], flush=True)
    header = "| model | proj | rows | N x K | cuBLAS + norm/act µs | GB/s | gemv µs | GB/s | speedup |"
    header += " read µs | GB/s |" if args.read_floor else ""
    header += " gemv + PDL µs |" if args.pdl else ""
    header += " best config | µs | GB/s |" if args.sweep else ""
    lines += [header, "|" + "---|" * header.count(" |")]
    print(header, flush=True)
    results = []
    before, fused_ops = CublasProjections(), TritonOps()
    pdl_ok = args.pdl and triton_gemv.supports_pdl(torch.cuda.current_device())
    for model in args.models.split(","):
        shape = SHAPES[model]
        for (name, n, k, kind), rows in itertools.product(
            projections(shape, args.lm_head), map(int, args.rows.split(","))
        ):
            dtype, dev = torch.bfloat16, "cuda"
            copies = max(2, math.ceil(L2_DEFEAT_BYTES / (n * k * 2)))
            weights = [torch.randn(n, k, device=dev, dtype=dtype) * 0.02 for _ in range(copies)]
            x = torch.randn(rows, k, device=dev, dtype=dtype)
            residual = torch.randn(rows, k, device=dev, dtype=dtype)
            norm_w = torch.rand(k, device=dev, dtype=dtype) + 0.5
            gbytes = n * k * 2 / 1e3  # per µs -> GB/s
            base = time_us(make_call(before, kind, x, residual, norm_w), weights)
            line = f"| {model} | {name} | {rows} | {n} x {k} | {base:.2f} | {gbytes / base:.0f} | "
            row: dict = dict(model=model, proj=name, rows=rows, n=n, k=k, torch_us=base, gemv_us=None)
            fits = rows <= triton_gemv.KERNEL_MAX_ROWS
            cfg = triton_gemv.gemv_config(rows, *gemv_shape(n, k, kind))
            if fits:
                row["gemv_us"] = gemv = time_us(make_call(fused_ops, kind, x, residual, norm_w, cfg), weights)
                line += f"{gemv:.2f} | {gbytes / gemv:.0f} | {base / gemv:.2f} |"
            else:
                line += "- | - | - |"
            if args.read_floor:
                row["read_us"] = read = read_floor_us(weights)
                line += f" {read:.2f} | {gbytes / read:.0f} |"
            if args.pdl:
                pdl_call = make_call(fused_ops, kind, x, residual, norm_w, cfg._replace(pdl=True))
                row["pdl_us"] = pdl = time_us(pdl_call, weights) if fits and pdl_ok else None
                line += f" {pdl:.2f} |" if pdl is not None else " - |"
            if args.sweep and fits:
                best: tuple[GemvConfig | None, float] = (None, math.inf)
                for cfg in sweep_configs(rows):
                    try:
                        us = time_us(make_call(fused_ops, kind, x, residual, norm_w, cfg), weights, reps=10)
                    except Exception as e:  # a config the compiler refuses (registers, shared memory)
                        print(f"  {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                        continue
                    best = min(best, (cfg, us), key=lambda b: b[1])
                row["best"] = best[0]._asdict() if best[0] else None
                row["best_us"] = best[1] if best[0] else None
                cfg_text = "/".join(map(str, best[0][:3])) if best[0] else "-"
                line += (
                    f" {cfg_text} | {best[1]:.2f} | {gbytes / best[1]:.0f} |" if best[0] else " - | - | - |"
                )
            elif args.sweep:  # more rows than the kernel takes: nothing swept
                line += " - | - | - |"
            results.append(row)
            lines.append(line)
            print(line, flush=True)
            del weights
            torch.cuda.empty_cache()
    write_results(args.out, "gemv_bench", lines, results)


if __name__ == "__main__":
    main()
