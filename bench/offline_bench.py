"""Offline engine throughput and the HF transformers baseline, on a GPU.

    python -m bench.offline_bench --out runs/offline

1. Offline throughput: ``LLM.generate`` over ``--num-seqs`` sequences whose input and output lengths
   are uniform in ``[--min-len, --max-len]`` (seed 0, ``ignore_eos``), Qwen3-0.6B shape, bf16 random
   weights, the engine's defaults on CUDA (Triton attention, decode CUDA graphs, fused kernels).
   Reports output tokens/s and total (input + output) tokens/s, end to end, after a warm-up run of
   a same-shape workload of other prompts (its time and the Triton kernels it compiled are reported too);
   by default once with overlap scheduling (the CUDA default) and once without, each with where the host's
   time went (wall time inside each engine phase, the wait for sampled tokens separately) and the
   number of prefill and decode steps. ``--runs`` picks the runs and their order, each on a fresh
   engine in this process (``profiled``: overlapped, under torch.profiler, with the GPU's busy and
   idle time and the kernels it went to).
2. HF ``generate`` on the same shapes: per-token decode latency at batch 1 after a ``--ctx``-token
   prompt (greedy, HF's own KV cache, sdpa attention), next to our engine's decode step from
   ``bench/engine_bench.py`` — the comparison users make first.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType

from bench.runner_timing import gpu_gaps
from engine.make_model import make_model

SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}  # fmt: skip
VOCAB = 151936


def model_dir(root: Path, name: str) -> Path:
    """A tokenizer from make_model and a config.json of the real shape; weights come from
    ``load_format="dummy"`` (random, never written to disk)."""
    path = make_model(root / name)
    cfg = json.loads((path / "config.json").read_text())
    cfg |= SHAPES[name] | {"vocab_size": VOCAB, "max_position_embeddings": 40960, "torch_dtype": "bfloat16",
                           "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg))
    for f in path.glob("*.safetensors"):
        f.unlink()
    return path


class PhaseTimes:
    """Host wall time inside the engine's phases, by wrapping its methods (bench-only). The steps
    themselves, by kind, are ``StepTimeline``'s."""

    def __init__(self, engine) -> None:
        from engine.model_runner import PendingTokens

        self.seconds: dict[str, float] = {}
        self._wrap(engine.scheduler, "schedule", "schedule")
        self._wrap(engine.runner, "prepare", "prepare")
        self._wrap(engine.runner, "forward", "forward (launch)")
        self._wrap(engine.runner, "sample_async", "sample (launch)")
        self._wrap(engine.scheduler, "commit", "commit")
        self._wrap(engine, "_postprocess", "postprocess incl. wait")
        wait = PendingTokens.wait
        self._restore = lambda: setattr(PendingTokens, "wait", wait)
        timed = self._timed(wait, "wait for tokens")
        PendingTokens.wait = lambda pending: timed(pending)  # type: ignore[method-assign,assignment]

    def _timed(self, fn, key: str):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t

        return timed

    def _wrap(self, obj, name: str, key: str) -> None:
        setattr(obj, name, self._timed(getattr(obj, name), key))

    def report(self) -> dict:
        self._restore()
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        out["postprocess excl. wait"] = round(
            self.seconds["postprocess incl. wait"] - self.seconds["wait for tokens"], 2
        )
        return out


class HostStalls:
    """What can stall the host inside a run besides the engine's own work, counted inside the
    ``with`` block: Python's garbage collector (seconds in collections of the oldest generation, and
    all) and the CUDA caching allocator (device allocations, and retries after freeing its cache,
    which synchronise). ``report`` after the block."""

    def __init__(self) -> None:
        self.report: dict = {}
        self._gc = {"gc gen2": 0.0, "gc all": 0.0}
        self._start = 0.0
        self._memory: dict[str, int] = {}

    def __enter__(self) -> HostStalls:
        gc.callbacks.append(self._on_gc)
        self._memory = self._allocator()
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._on_gc)
        now = self._allocator()
        self.report = {k: round(v, 3) for k, v in self._gc.items()} | {
            k: now[k] - self._memory[k] for k in now
        }

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        took = time.perf_counter() - self._start
        self._gc["gc all"] += took
        if info.get("generation") == 2:
            self._gc["gc gen2"] += took

    @staticmethod
    def _allocator() -> dict[str, int]:
        stats = torch.cuda.memory_stats()
        return {
            "cuda mallocs": stats.get("num_device_alloc", 0),
            "alloc retries": stats.get("num_alloc_retries", 0),
        }


class StepTimeline:
    """Each launched step's GPU time and the device's idle time before it, from two CUDA events per
    step (recorded around ``Engine._launch``, no sync): the steps and their rows (sequences) by
    kind, where a run's GPU idle time falls, and the first steps one by one (the prefill chunks).
    Host launch time per step too."""

    def __init__(self, engine) -> None:
        self._t0 = time.perf_counter()
        self._steps: list[tuple[str, int, int, float, float, torch.cuda.Event, torch.cuda.Event]] = []
        launch = engine._launch

        def timed(batch):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t = time.perf_counter()
            start.record()
            out = launch(batch)
            end.record()
            kind = "decode" if batch.is_decode else "extend"
            self._steps.append((kind, batch.num_tokens, len(batch.seqs), t - self._t0,
                                time.perf_counter() - t, start, end))  # fmt: skip
            return out

        engine._launch = timed

    def report(self, first: int = 24) -> dict:
        """Call after the run, the device synchronised."""
        rows: list[str] = []
        totals: dict[str, dict[str, float]] = {}
        previous = None
        for kind, tokens, seqs, at, host, start, end in self._steps:
            gpu = start.elapsed_time(end)
            idle = previous.elapsed_time(start) if previous is not None else 0.0
            previous = end
            t = totals.setdefault(
                kind, {"steps": 0, "rows": 0, "gpu_ms": 0.0, "idle_before_ms": 0.0, "host_launch_ms": 0.0}
            )
            t["steps"] += 1
            t["rows"] += seqs
            t["gpu_ms"] += gpu
            t["idle_before_ms"] += idle
            t["host_launch_ms"] += host * 1e3
            if len(rows) < first:
                rows.append(f"{kind} tokens={tokens} seqs={seqs} launched_at={at * 1e3:.1f}ms "
                            f"host={host * 1e3:.2f}ms gpu={gpu:.2f}ms idle_before={idle:.2f}ms")  # fmt: skip
        return {k: {n: round(v, 1) for n, v in t.items()} for k, t in totals.items()} | {"first_steps": rows}


def triton_cache_entries() -> list[str]:
    """The kernels in Triton's on-disk cache (a directory each, named by hash, holding
    ``<kernel>.json``): what a run compiled, by name."""
    cache = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    if not cache.is_dir():
        return []
    return [
        f"{d.name[:8]}:{j.stem}"
        for d in cache.iterdir()
        for j in d.glob("*.json")
        if not j.stem.startswith("__grp__")
    ]


def gpu_time_by_kernel(events, top: int = 15) -> dict:
    """Device time per kernel name over a profiled run (graph replays included), largest first, and
    the device's idle time in each tenth of the run (from its first kernel to its last)."""
    totals: dict[str, float] = {}
    for e in events:
        if e.device_type == DeviceType.CUDA:
            totals[e.name] = totals.get(e.name, 0.0) + e.time_range.elapsed_us()
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    span, busy, gaps = gpu_gaps(events)
    idle = [0.0] * 10
    for start, length, _, _ in gaps:  # each gap's time goes to the tenths it overlaps
        for tenth in range(int(10 * start / span), min(10, int(10 * (start + length) / span) + 1)):
            lo, hi = tenth * span / 10, (tenth + 1) * span / 10
            idle[tenth] += max(0.0, min(hi, start + length) - max(lo, start))
    return {
        "span_s": round(span / 1e6, 3),
        "busy_s": round(busy / 1e6, 3),
        "idle_s_by_tenth": [round(t / 1e6, 3) for t in idle],
        "largest_gaps": [
            f"{length / 1e3:.2f} ms at {start / 1e6:.3f} s after {before[:50]} before {after[:50]}"
            for start, length, before, after in sorted(gaps, key=lambda g: -g[1])[:12]
        ],
    } | {name[:70]: round(us / 1e6, 3) for name, us in ranked[:top]}


def offline_throughput(
    path: Path, num_seqs: int, lo: int, hi: int, overlap: bool = True, profile: bool = False
) -> dict:
    from engine import LLM, SamplingParams

    llm = LLM(str(path), device="cuda", dtype="bfloat16", load_format="dummy", attention_backend="triton",
              max_num_seqs=256, max_num_batched_tokens=8192, overlap=overlap)  # fmt: skip

    def workload(seed: int) -> tuple[list[list[int]], list]:
        rng = random.Random(seed)
        prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(num_seqs)]
        params = [
            SamplingParams(temperature=0, max_tokens=rng.randint(lo, hi), ignore_eos=True) for _ in prompts
        ]
        return prompts, params

    # Warm-up: a workload of the same shape with other prompts (the same ones would hit the prefix
    # cache and skip the timed run's prefill), timed on its own: its batches JIT-compile the Triton
    # kernels the startup capture did not (shapes only this mix of prefill chunks and decode reaches).
    compiled_before = set(triton_cache_entries())
    start = time.perf_counter()
    llm.generate(*workload(1))
    torch.cuda.synchronize()
    first_run = {"first_run_seconds": round(time.perf_counter() - start, 2),
                 "first_run_triton_compiles": sorted(set(triton_cache_entries()) - compiled_before)}  # fmt: skip
    prompts, params = workload(0)
    phases = PhaseTimes(llm.engine)
    timeline = StepTimeline(llm.engine)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) if profile else None
    with HostStalls() as stalls, profiler or contextlib.nullcontext():
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    host = phases.report() | stalls.report
    steps = timeline.report()
    num_in = sum(len(p) for p in prompts)
    num_out = sum(len(o.token_ids) for o in outs)
    assert num_out == sum(p.max_tokens for p in params), "ignore_eos: every sequence runs to max_tokens"
    kv_pages = llm.engine.runner.num_pages
    del llm, phases, timeline
    gc.collect()  # graph runners sit in reference cycles; the next engine needs their memory
    torch.cuda.empty_cache()
    return first_run | {"kv_pages": kv_pages, "overlap": overlap, "seconds": round(elapsed, 2), "input_tokens": num_in, "output_tokens": num_out,
            "output_tok_s": round(num_out / elapsed), "total_tok_s": round((num_in + num_out) / elapsed),
            "host_seconds": host, "steps": steps} | ({"gpu_seconds": gpu_time_by_kernel(profiler.events())} if profiler else {})  # fmt: skip


@torch.inference_mode()
def hf_decode_ms(path: Path, ctx: int, new_tokens: int) -> float:
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16,
                                                              attn_implementation="sdpa").eval()  # fmt: skip
    prompt = torch.randint(0, VOCAB, (1, ctx), device="cuda")

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(4)
    # decode time per token = (time for n tokens - time for 1 token) / (n - 1): the prefill cancels out
    return (run(new_tokens) - run(1)) / (new_tokens - 1) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--hf-models", default="qwen3-0.6b,qwen3-8b")
    p.add_argument("--skip-offline", action="store_true")
    p.add_argument(
        "--runs",
        default="overlap,no-overlap",
        help="the offline runs, in order, each on a fresh engine: overlap, no-overlap, or profiled "
        "(overlap under torch.profiler: GPU busy/idle time and the top kernels)",
    )
    p.add_argument("--out", default="runs/offline")
    args = p.parse_args()
    runs = args.runs.split(",")
    if unknown := set(runs) - {"overlap", "no-overlap", "profiled"}:
        p.error(f"--runs: unknown {', '.join(sorted(unknown))}")
    results: dict = {"gpu": torch.cuda.get_device_name()}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        if not args.skip_offline:
            path = model_dir(root, "qwen3-0.6b")
            for i, run in enumerate(runs):
                key = f"offline_qwen3_0.6b_{i + 1}_{run}"
                results[key] = offline_throughput(
                    path, args.num_seqs, args.min_len, args.max_len, run != "no-overlap", run == "profiled"
                )
                print("offline", key, results[key], flush=True)
        for name in filter(None, args.hf_models.split(",")):
            results[f"hf_generate_{name}_bs1_ctx{args.ctx}_ms_per_token"] = round(
                hf_decode_ms(model_dir(root, name), args.ctx, 64), 2
            )
            torch.cuda.empty_cache()
            print(
                name,
                "HF generate ms/token",
                results[f"hf_generate_{name}_bs1_ctx{args.ctx}_ms_per_token"],
                flush=True,
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "offline_bench.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
