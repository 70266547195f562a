"""Engine step times (eager baseline) next to their roofline floors, measured in the same run.

    python -m bench.engine_bench --models qwen3-0.6b,qwen3-8b --prefill 512,2048,8192 --decode-bs 1,64 --ctx 1024
    python -m bench.engine_bench --attention-backend triton --cuda-graphs --decode-bs 1,8,64,256

``--cuda-graphs`` (needs ``--attention-backend triton``) captures decode CUDA graphs and times every
decode row on the same runner, weights and KV: eager ("step ms"); replayed from the graph, one step
at a time ("graph ms": prepare, replay, sample, wait for the tokens); pipelined as the engine runs it
with overlap scheduling ("overlap ms": step N+1 staged and launched before step N's tokens are
waited for); and the graph replays alone, back to back ("gpu ms": the device time, no host work). Prefill rows get "graph ms" from piecewise CUDA graphs
(``engine.graphs.piecewise``, captured up to the largest ``--prefill``) against eager "step ms".
``--idle-before S`` adds "isolated ms" to prefill rows: the eager step with the GPU idle S seconds
before each one, as a lone request meets it (back-to-back long prefills heat an H100 into its
power cap, which lowers the SM clock: "step ms" is the sustained figure). ``--profile`` prints where
one step's time goes and the GPU's idle gaps inside it. ``--ctx 1024,4096`` repeats the decode rows per context length (rows whose KV does not fit are
skipped, with a line saying so).

Norms, rotary and SiLU run as fused Triton kernels, and batch-1 projections as fused Triton GEMVs
(``EngineConfig.fused_kernels``, the default); ``--no-fused-kernels`` runs them as torch ops and
cuBLAS, to compare.

Random bf16 weights of the real shapes (no checkpoint read). A step is what the engine does per
iteration: prepare (host → device), forward, sample (greedy) incl. the token read-back; timed with
CUDA events, median of repeats after warm-up. Floors (docs/BENCHMARKS.md, "Machines, shapes, floors"):
  decode  = (weights read incl. lm_head + KV of the batch) / copy bandwidth
  prefill = (2 · matmul params · tokens + causal attention FLOPs) / bf16 GEMM rate
with bandwidth and GEMM rate measured on this GPU at start.
"""

from __future__ import annotations

import argparse
import gc
import os
from dataclasses import asdict, dataclass

import torch

from bench.runner_timing import (
    VOCAB,
    gpu_step_ms,
    isolated_step_ms,
    make_runner,
    measure_ceilings,
    model_config,
    overlap_step_ms,
    print_gpu_gaps,
    run_step,
    sequences,
    step_ms,
    write_results,
)
from engine.model_runner import ModelRunner
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence


@dataclass
class Row:
    model: str
    phase: str
    batch: int
    tokens_or_ctx: int
    ms: float
    floor_ms: float
    graph_ms: float | None = None  # decode step replayed from a CUDA graph (--cuda-graphs)
    overlap_ms: float | None = None  # graph steps pipelined as with overlap scheduling
    gpu_ms: float | None = None  # graph replays back to back: device time alone
    isolated_ms: float | None = None  # eager prefill after the GPU idled (--idle-before)

    @property
    def ratio(self) -> float:
        return self.ms / self.floor_ms

    @property
    def graph_ratio(self) -> float | None:
        return None if self.graph_ms is None else self.graph_ms / self.floor_ms


def bench_model(name: str, args, bw: float, flops: float) -> list[Row]:
    cfg = model_config(name, max(*args.prefill, *args.ctx) + 16)
    runner = make_runner(
        cfg,
        max(args.prefill),
        args.attention_backend,
        args.cuda_graphs,
        max(args.decode_bs),
        fused_kernels=not args.no_fused_kernels,
    )
    graphs = runner.graphs
    if runner.piecewise is not None:
        print(
            f"{name}: piecewise graphs, {len(runner.piecewise.buckets)} buckets (16..{runner.piecewise.max_tokens} "
            f"tokens) x {runner.piecewise.num_pieces} pieces captured in {runner.piecewise.capture_seconds:.1f} s, "
            f"pool {runner.piecewise.graph_memory_bytes / 2**20:.0f} MiB",
            flush=True,
        )
    if args.cuda_graphs:
        assert graphs is not None, "--cuda-graphs needs --attention-backend triton"
        print(
            f"{name}: {len(graphs.batch_sizes)} decode graphs (bs 1..{graphs.max_batch_size}) captured in "
            f"{graphs.capture_seconds:.1f} s, graph pool {graphs.graph_memory_bytes / 2**20:.0f} MiB, "
            f"static buffers {graphs.static_bytes / 2**20:.0f} MiB",
            flush=True,
        )
    params = sum(p.numel() for p in runner.model.parameters())
    embed = VOCAB * cfg.hidden_size
    lm_head = embed
    matmul_params = params - embed - (0 if cfg.tie_word_embeddings else lm_head)
    weight_bytes_read = (matmul_params + lm_head) * 2  # the embedding table is gathered, not read
    kv_bytes_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
    rows = []
    for n in args.prefill:
        seqs = sequences(runner, 1, n, 0)
        ms = step_ms(runner, seqs, [n], decode=False, reps=args.reps)
        attn = 2 * n * n * cfg.num_heads * cfg.head_dim * cfg.num_layers  # causal QK^T + PV
        floor = (2 * matmul_params * n + 2 * lm_head + attn) / flops * 1e3
        rows.append(Row(name, "prefill", 1, n, ms, floor))
        if args.idle_before > 0:
            rows[-1].isolated_ms = isolated_step_ms(runner, seqs, [n], False, args.reps, args.idle_before)
        # "graph ms" where the engine runs this step from its piecewise graphs (a lone long prompt
        # whose attention makes it GPU-bound stays eager: ModelRunner._piecewise_pays)
        staged = runner.piecewise is not None and runner.piecewise.is_staged(
            runner.prepare(ScheduledBatch(seqs, [n], is_decode=False))
        )
        if staged:
            rows[-1].graph_ms = step_ms(runner, seqs, [n], decode=False, reps=args.reps, graphs=True)
        print(rows[-1], flush=True)
    for ctx in args.ctx:
        for bs in args.decode_bs:
            if bs * -(-ctx // runner.cfg.page_size) >= runner.num_pages:
                print(f"{name} decode bs {bs} ctx {ctx}: skipped, its KV needs more than the pool's "
                      f"{runner.num_pages} pages", flush=True)  # fmt: skip
                continue
            seqs = sequences(runner, bs, ctx, ctx - 1)
            ms = step_ms(runner, seqs, [1] * bs, decode=True, reps=args.reps)
            row = Row(
                name, "decode", bs, ctx, ms, (weight_bytes_read + bs * ctx * kv_bytes_per_token) / bw * 1e3
            )
            if graphs is not None and bs <= graphs.max_batch_size:
                row.graph_ms = step_ms(runner, seqs, [1] * bs, decode=True, reps=args.reps, graphs=True)
                row.overlap_ms = overlap_step_ms(runner, seqs, reps=4 * args.reps)
                row.gpu_ms = gpu_step_ms(runner, seqs, reps=args.reps)
            rows.append(row)
            print(rows[-1], flush=True)
    if args.profile:
        n = max(args.prefill)
        profile_step(runner, sequences(runner, 1, n, 0), [n], decode=False, label=f"{name} prefill {n}")
        ctx = args.ctx[0]
        seqs = sequences(runner, 1, ctx, ctx - 1)
        profile_step(runner, seqs, [1], decode=True, label=f"{name} decode bs1")
        if graphs is not None:
            profile_step(runner, seqs, [1], decode=True, label=f"{name} decode bs1 graph", graphs=True)
    del runner, graphs
    gc.collect()  # graphs and their pool sit in reference cycles; the next model needs the memory
    torch.cuda.empty_cache()
    return rows


def profile_step(
    runner: ModelRunner, seqs: list[Sequence], lens: list[int], decode: bool, label: str, graphs: bool = False
) -> None:
    """Where a step's time goes: kernel launches vs GPU time (torch.profiler, top ops by CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    batch = ScheduledBatch(seqs, lens, is_decode=decode)
    run_step(runner, batch, graphs)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_step(runner, batch, graphs)
    events = prof.key_averages()
    launches = sum(
        e.count
        for e in events
        # Triton launches through cuLaunchKernelEx
        if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
    )
    print(f"profile {label}: {launches} kernel launches", flush=True)
    print_gpu_gaps(prof.events())
    print(events.table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
    print(events.table(sort_by="self_device_time_total", row_limit=25), flush=True)


def table(rows: list[Row], graph_columns: bool) -> list[str]:
    """The markdown table; the graph columns ("-" where a row has no graph time) only if asked for."""

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    if not graph_columns:
        return [
            "| model | phase | batch | tokens / ctx | step ms | isolated ms | floor ms | x floor |",
            "|---|---|---|---|---|---|---|---|",
            *(
                f"| {r.model} | {r.phase} | {r.batch} | {r.tokens_or_ctx} | {r.ms:.2f} | {ms(r.isolated_ms)} "
                f"| {r.floor_ms:.2f} | {r.ratio:.1f} |"
                for r in rows
            ),
        ]
    lines = [
        "| model | phase | batch | tokens / ctx | step ms | isolated ms | graph ms | graph speedup | overlap ms | gpu ms "
        "| floor ms | x floor | best x floor | tok/s (overlap) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    for r in rows:
        best = min(v for v in (r.ms, r.isolated_ms, r.graph_ms, r.overlap_ms) if v is not None)
        speedup = "-" if r.graph_ms is None else f"{r.ms / r.graph_ms:.2f}"
        tps = "-" if r.overlap_ms is None else f"{r.batch / r.overlap_ms * 1e3:,.0f}"
        lines.append(
            f"| {r.model} | {r.phase} | {r.batch} | {r.tokens_or_ctx} | {r.ms:.2f} | {ms(r.isolated_ms)} "
            f"| {ms(r.graph_ms)} | {speedup} "
            f"| {ms(r.overlap_ms)} | {ms(r.gpu_ms)} | {r.floor_ms:.2f} | {r.ratio:.1f} | {best / r.floor_ms:.2f} "
            f"| {tps} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3-0.6b,qwen3-8b")
    p.add_argument("--prefill", default="512,2048,8192")
    p.add_argument("--decode-bs", default="1,64")
    p.add_argument("--ctx", default="1024", help="decode context lengths, comma-separated")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--attention-backend", default="torch_native", choices=["torch_native", "triton"])
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="also time decode replayed from CUDA graphs (needs --attention-backend triton)",
    )
    p.add_argument(
        "--no-fused-kernels",
        action="store_true",
        help="norms, rotary and SiLU as torch ops instead of the fused Triton kernels",
    )
    p.add_argument(
        "--idle-before",
        type=float,
        default=0.0,
        help="also time each prefill row with the GPU idle this many seconds before every step "
        "(isolated ms: a lone request's clocks; back-to-back steps power-cap the card)",
    )
    p.add_argument("--profile", action="store_true", help="print a torch.profiler summary of a decode step")
    p.add_argument("--out", default=os.environ.get("OUT", "runs"))
    args = p.parse_args()
    if args.cuda_graphs and args.attention_backend != "triton":
        p.error("--cuda-graphs needs --attention-backend triton")
    args.prefill = [int(x) for x in args.prefill.split(",")]
    args.decode_bs = [int(x) for x in args.decode_bs.split(",")]
    args.ctx = [int(x) for x in args.ctx.split(",")]

    bw, flops = measure_ceilings()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: copy {bw / 1e12:.2f} TB/s, bf16 GEMM {flops / 1e12:.0f} TFLOP/s", flush=True)
    rows = [r for m in args.models.split(",") for r in bench_model(m, args, bw, flops)]

    lines = [
        f"GPU: {gpu}; copy {bw / 1e12:.2f} TB/s; bf16 GEMM {flops / 1e12:.0f} TFLOP/s; torch {torch.__version__}; "
        f"layer ops: {'torch' if args.no_fused_kernels else 'triton (fused)'}",
        "",
        *table(rows, args.cuda_graphs),
    ]
    print("\n".join(lines))
    write_results(
        args.out,
        "engine_bench",
        lines,
        {
            "gpu": gpu,
            "copy_bytes_per_s": bw,
            "gemm_flops": flops,
            "fused_kernels": not args.no_fused_kernels,
            "rows": [asdict(r) | {"x_floor": r.ratio, "graph_x_floor": r.graph_ratio} for r in rows],
        },
    )


if __name__ == "__main__":
    main()
