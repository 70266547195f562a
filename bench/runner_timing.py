"""What the GPU benches share: the model shapes, a CUDA-event timer, the copy/GEMM ceilings, a
``ModelRunner`` of random weights, hand-built decode batches timed one step at a time, pipelined as
the overlapped engine runs them, or as graph replays alone; and writing a result table + JSON."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType

from engine.config import EngineConfig, ModelConfig, RopeConfig
from engine.distributed import TPGroup
from engine.distributed.context_parallel import CPGroup
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence

SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(
        hidden_size=1024,
        intermediate_size=3072,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    "qwen3-8b": dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
}
VOCAB = 151936


def model_config(name: str, max_len: int) -> ModelConfig:
    return ModelConfig(
        architecture="Qwen3ForCausalLM",
        vocab_size=VOCAB,
        rms_norm_eps=1e-6,
        max_position_embeddings=max_len,
        attention_bias=False,
        rope=RopeConfig(theta=1e6),
        dtype="bfloat16",
        **SHAPES[name],
    )


def measure_ceilings() -> tuple[float, float]:
    """(copy bandwidth bytes/s counting read+write, bf16 GEMM FLOP/s), on random data."""
    x = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    bw_ms = cuda_time_ms(lambda: y.copy_(x), warmup=3, reps=20)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = cuda_time_ms(lambda: a @ b, warmup=3, reps=20)
    return 2 * (1 << 30) / (bw_ms / 1e3), 2 * 8192**3 / (mm_ms / 1e3)


def cuda_time_ms(fn, warmup: int, reps: int) -> float:
    """Median over ``reps`` of ``fn``'s time between two CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_runner(
    cfg: ModelConfig,
    max_tokens: int,
    attention_backend: str,
    cuda_graphs: bool,
    max_bs: int,
    fused_kernels: bool = True,
    device: str = "cuda",
    tp: TPGroup | None = None,
    kv_cache_bytes: int | None = None,
    cp: CPGroup | None = None,
    **options: Any,
) -> ModelRunner:
    """``options``: further ``EngineConfig`` fields, overriding the ones set here. ``tp`` / ``cp``:
    this rank's group when the runner is one of several ranks."""
    with tempfile.TemporaryDirectory() as d:
        fields: dict[str, Any] = dict(
            model=d,
            device=device,
            kv_cache_bytes=kv_cache_bytes,
            dtype="bfloat16",
            load_format="dummy",
            max_num_seqs=max(256, max_bs),
            max_num_batched_tokens=max_tokens,
            max_piecewise_tokens=max_tokens,  # graphs for every step the engine would replay (not by model size)
            gpu_memory_utilization=0.9,
            attention_backend=attention_backend,
            cuda_graphs=cuda_graphs,
            fused_kernels=fused_kernels,
            max_graph_batch_size=max(256, max_bs),
            tp=1 if tp is None else tp.world_size,
            cp=1 if cp is None else cp.world_size,
        )
        runner = ModelRunner(EngineConfig(**(fields | options)), cfg, tp=tp, cp=cp)
    runner.kv_pool.kv_gpu.normal_()  # never time on zeros
    return runner


def run_step(runner: ModelRunner, batch: ScheduledBatch, graphs: bool = False) -> None:
    """One engine step of ``batch`` as the benches time it: prepare, forward, sample (greedy) and
    the token read-back; ``graphs``: through the runner's CUDA graphs where they take the batch."""
    runner.sample(runner.forward(runner.prepare(batch, use_graphs=graphs)), batch)


def step_ms(
    runner: ModelRunner, seqs: list[Sequence], lens: list[int], decode: bool, reps: int, graphs: bool = False
) -> float:
    batch = ScheduledBatch(seqs, lens, is_decode=decode)
    return cuda_time_ms(lambda: run_step(runner, batch, graphs), warmup=3, reps=reps)


def isolated_step_ms(
    runner: ModelRunner, seqs: list[Sequence], lens: list[int], decode: bool, reps: int, idle_s: float
) -> float:
    """``step_ms`` (eager) with the GPU idle for ``idle_s`` before each timed step: one request
    arriving at an idle server. Back-to-back compute-bound steps (``step_ms``) heat the card until it
    caps its power and lowers its clocks; this times the step at the clocks a lone request gets."""
    batch = ScheduledBatch(seqs, lens, is_decode=decode)
    run_step(runner, batch)  # warm
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        time.sleep(idle_s)
        times.append(cuda_time_ms(lambda: run_step(runner, batch), warmup=0, reps=1))
    return statistics.median(times)


def overlap_step_ms(runner: ModelRunner, seqs: list[Sequence], reps: int) -> float:
    """Graph decode steps as the overlapped engine runs them: step N+1 is prepared and launched before
    step N's tokens are waited for. Wall time per step over ``reps`` steps."""
    batch = ScheduledBatch(seqs, [1] * len(seqs), is_decode=True)

    def steps(n: int) -> None:
        previous = None
        for _ in range(n):
            pending = runner.sample_async(runner.forward(runner.prepare(batch)), batch)
            if previous is not None:
                previous.wait()
            previous = pending
        assert previous is not None
        previous.wait()

    steps(3)
    start = time.perf_counter()
    steps(reps)
    return (time.perf_counter() - start) * 1e3 / reps


def gpu_step_ms(runner: ModelRunner, seqs: list[Sequence], reps: int) -> float:
    """The decode graph of this batch replayed back to back: device time per step, no host work."""
    graphs = runner.graphs
    assert graphs is not None
    batch = ScheduledBatch(seqs, [1] * len(seqs), is_decode=True)
    runner.forward(runner.prepare(batch))
    graph = graphs._graphs[graphs.padded_size(len(seqs))]
    return cuda_time_ms(lambda: [graph.replay() for _ in range(10)], warmup=2, reps=reps) / 10


def sequences(runner: ModelRunner, num: int, length: int, computed: int) -> list[Sequence]:
    ps, seqs, next_page = runner.cfg.page_size, [], 1
    g = torch.Generator().manual_seed(0)
    for i in range(num):
        toks = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        seq = Sequence(f"b{i}", toks, SamplingParams(temperature=0), seed=0, max_len=length + 1)
        n = -(-length // ps)
        assert next_page + n <= runner.num_pages, "KV pool too small for this shape"
        seq.pages, next_page = list(range(next_page, next_page + n)), next_page + n
        seq.num_computed = computed
        seqs.append(seq)
    return seqs


def write_results(out_dir: str | Path, name: str, lines: list[str], payload: Any) -> None:
    """``lines`` to ``<out_dir>/<name>.md`` and ``payload`` to ``<name>.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1))


def gpu_gaps(events) -> tuple[float, float, list[tuple[float, float, str, str]]]:
    """Over profiled ``events`` (``prof.events()``), from the first kernel to the last: (span µs, µs
    with a kernel running, the idle gaps as (start µs from the first kernel, length µs, kernel
    before, kernel after)): where the device waited on the host."""
    spans = sorted(
        (e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type == DeviceType.CUDA
    )
    if not spans:
        return 0.0, 0.0, []
    first = spans[0][0]
    busy, gaps, end, before = 0.0, [], first, ""
    for start, stop, name in spans:
        if start > end:
            gaps.append((end - first, start - end, before, name))
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, before = stop, name
    return end - first, busy, gaps


def print_gpu_gaps(events, top: int = 5) -> None:
    """``gpu_gaps`` in a line, and the ``top`` largest gaps with the kernels on either side."""
    span, busy, gaps = gpu_gaps(events)
    print(f"  GPU span {span / 1e3:.2f} ms, kernels running {busy / 1e3:.2f} ms, idle {(span - busy) / 1e3:.2f} ms "
          f"in {len(gaps)} gaps; largest:", flush=True)  # fmt: skip
    for _, gap, prev, nxt in sorted(gaps, key=lambda g: -g[1])[:top]:
        print(f"    {gap / 1e3:.3f} ms after {prev[:60]} before {nxt[:60]}", flush=True)
