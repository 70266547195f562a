"""Served against offline: what ``pdserve up`` delivers to a load tool, next to what the engine makes
offline on the same workload, and what each process spends on the CPU per output token.

    python -m bench.served_bench --shape qwen3-0.6b --systems colocated,1p1d --concurrency 1,16,64,256 --out runs
    python -m bench.served_bench --model tiny --systems colocated,1p1d --concurrency 64 \
        --min-len 32 --max-len 128 --output-len 128 --out runs        # the CPU box

1. The model: ``--shape``: a config of that shape, a tokenizer of the model's vocabulary size (so every
   sampled id detokenizes at a real vocabulary's cost) and ``--load-format dummy`` weights;
   ``--model tiny``: the embedded tiny model ``pdserve up`` serves by default; ``--model DIR``: that
   checkpoint.
2. Offline: ``LLM.generate`` over the largest concurrency's workload (prompt lengths uniform in
   ``[--min-len, --max-len]``, output lengths likewise or ``--output-len``, ``ignore_eos``) after a
   warm-up run: output tok/s and the process's CPU µs per output token.
3. Each system started with ``pdserve up`` and the engine flags a user gets by default (plus
   ``--engine-flags``): ``colocated`` (``--num-prefill 0``) and ``1p1d`` (one prefill and one decode;
   on one GPU KV goes over ``cuda_ipc``). At each concurrency ``pdserve bench``'s load generator (REST,
   streaming) sends ``--requests-per-concurrency x concurrency`` requests (at least 4) of the same
   lengths: output tok/s, TTFT and TPOT p50/p99, and the process CPU µs per output token of the
   gateway and each instance (read from the gateway's ``/metrics``) and of the load tool.

Writes ``served_bench.json`` and prints a markdown table. Exit code 1 when a request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.offline_bench import SHAPES, VOCAB
from engine.config import ModelConfig
from engine.env import Env
from engine.make_model import make_model
from pdserve.engine_args import default_model_dir
from pdserve.loadtest.load_test import LoadTestConfig, build_workload, run

SYSTEMS = {"colocated": ["--num-prefill", "0"], "1p1d": []}
CUDA_1P1D = ["--kv-backend", "cuda_ipc"]  # prefill and decode share the GPU


def model_dir(root: Path, args: argparse.Namespace) -> Path:
    if args.model == "tiny":
        return default_model_dir(Env.read())
    if args.model:
        return Path(args.model)
    path = make_model(root / args.shape, vocab_size=VOCAB, tokenizer_size=VOCAB, weights=False)
    cfg = json.loads((path / "config.json").read_text())
    cfg |= SHAPES[args.shape] | ({"num_hidden_layers": args.layers} if args.layers else {}) | {
        "max_position_embeddings": 40960, "torch_dtype": "bfloat16", "dtype": "bfloat16", "rope_theta": 1000000.0}  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def workload(args: argparse.Namespace, concurrency: int, vocab: int, seed: int = 0) -> LoadTestConfig:
    out_min, out_max = args.output_len or (args.min_len, args.max_len)
    lens = dict(input_len_min=args.min_len, input_len_max=args.max_len, output_len_min=out_min,
                output_len_max=out_max)  # fmt: skip
    return LoadTestConfig(
        num_requests=max(4, args.requests_per_concurrency * concurrency), max_concurrency=concurrency,
        vocab_low=0, vocab_high=vocab - 8, seed=seed, progress=False, request_timeout_s=600, **lens,
    )  # fmt: skip


def weights_flags(args: argparse.Namespace) -> list[str]:
    """Shapes have no weights on disk: dummy ones, in bfloat16; a real checkpoint loads as it is."""
    return [] if args.model else ["--load-format", "dummy", "--dtype", "bfloat16"]


def offline(path: Path, args: argparse.Namespace, vocab: int, engine_options: dict) -> dict:
    from engine import LLM, SamplingParams

    def params(specs):
        return [SamplingParams(temperature=0, max_tokens=s.max_tokens, ignore_eos=True) for s in specs]

    biggest = max(args.concurrency)
    weights = {} if args.model else {"dtype": "bfloat16", "load_format": "dummy"}
    with LLM(str(path), **weights, **engine_options) as llm:
        warm = build_workload(workload(args, biggest, vocab, seed=1))[: biggest // 2 or 1]
        llm.generate([s.prompt for s in warm], params(warm))
        specs = build_workload(workload(args, biggest, vocab))[:biggest]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        outs = llm.generate([s.prompt for s in specs], params(specs))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        config = {k: str(v) for k, v in vars(llm.engine.cfg).items()}
    num_out = sum(len(o.token_ids) for o in outs)
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"num_seqs": len(specs), "output_tokens": num_out, "seconds": elapsed,
            "output_tok_s": num_out / elapsed, "cpu_us_per_token": 1e6 * cpu / num_out,
            "engine_config": config}  # fmt: skip


class System:
    """``pdserve up`` as a child process; its children found by their command lines."""

    def __init__(self, path: Path, flags: list[str], log: Path) -> None:
        cmd = [sys.executable, "-m", "pdserve", "up", "--model", str(path), "--port", "0", "--grpc-port", "0",
               *flags]  # fmt: skip
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            self.lines.put(line)

    def wait_up(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pdserve up exited with {self.proc.returncode}; see {self.log.name}")
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line.startswith("{") and '"status": "up"' in line:
                return json.loads(line)["openai_base_url"].removesuffix("/v1")
        raise TimeoutError(f"pdserve up not ready within {timeout_s:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def serve(path: Path, system: str, args: argparse.Namespace, vocab: int, out: Path) -> list[dict]:
    flags = SYSTEMS[system] + (CUDA_1P1D if system == "1p1d" and torch.cuda.is_available() else [])
    sut = System(path, flags + weights_flags(args) + args.engine_flags.split(), out / f"{system}.up.log")
    rows = []
    try:
        base_url = sut.wait_up(args.start_timeout_s)
        warm = workload(args, 8, vocab, seed=1)
        asyncio.run(run(LoadTestConfig(**{**vars(warm), "base_url": base_url, "num_requests": 16})))
        for concurrency in args.concurrency:
            cfg = LoadTestConfig(**{**vars(workload(args, concurrency, vocab)), "base_url": base_url})
            driver_before = time.process_time()
            summary, records, _ = asyncio.run(run(cfg))
            num_out = sum(r.output_tokens for r in records if r.success)
            cpu_us = {_role(name): us for name, us in summary.server_cpu_us_per_token.items()}
            cpu_us["load_tool"] = 1e6 * (time.process_time() - driver_before) / max(num_out, 1)
            rows.append({
                "system": system, "concurrency": concurrency, "num_requests": cfg.num_requests,
                "failed": summary.num_failed, "output_tokens": num_out,
                "output_tok_s": summary.output_token_throughput,
                "ttft_ms": _percentiles(summary.ttft), "tpot_ms": _percentiles(summary.tpot),
                "cpu_us_per_token": cpu_us, "errors": summary.errors,
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    finally:
        sut.stop()
    return rows


def _role(name: str) -> str:
    """ "decode@127.0.0.1:4242" -> "decode" (one instance per role here)."""
    return name.split("@", 1)[0]


def _percentiles(stats) -> dict[str, float] | None:
    return None if stats is None else {"p50": stats.median_ms, "p99": stats.p99_ms}


def table(offline_row: dict, rows: list[dict]) -> str:
    lines = ["| system | conc. | output tok/s | / offline | TTFT p50 / p99 ms | TPOT p50 / p99 ms | CPU µs/token |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ttft, tpot = r["ttft_ms"] or {}, r["tpot_ms"] or {}
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["cpu_us_per_token"].items()))
        lines.append(
            f"| {r['system']} | {r['concurrency']} | {r['output_tok_s']:,.0f} | "
            f"{r['output_tok_s'] / offline_row['output_tok_s']:.2f} | {ttft.get('p50', 0):.1f} / "
            f"{ttft.get('p99', 0):.1f} | {tpot.get('p50', 0):.2f} / {tpot.get('p99', 0):.2f} | {cpu} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    p.add_argument(
        "--model",
        default="",
        help="'tiny' (the embedded model) or a checkpoint directory, instead of --shape",
    )
    p.add_argument(
        "--layers", type=int, default=None, help="override the shape's layer count (a CPU smoke run)"
    )
    p.add_argument("--systems", default="colocated,1p1d")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 256])
    p.add_argument("--requests-per-concurrency", type=int, default=2)
    p.add_argument(
        "--min-len", type=int, default=100, help="prompt tokens (and output tokens without --output-len)"
    )
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument(
        "--output-len", type=lambda s: (int(s), int(s)), default=None, help="every output this long"
    )
    p.add_argument(
        "--engine-flags", default="", help="extra flags for pdserve up (e.g. '--max-num-seqs 128')"
    )
    p.add_argument("--offline-options", default="{}", help="JSON engine options for the offline LLM")
    p.add_argument("--start-timeout-s", type=float, default=300)
    p.add_argument("--out", default=os.environ.get("OUT", "runs"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The offline engine gets what `pdserve up` resolves by default: the GPU and its fastest backend.
    engine_options = {"device": "auto", "attention_backend": "auto"} | json.loads(args.offline_options)
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(Path(tmp), args)
        vocab = ModelConfig.from_dir(str(path)).vocab_size
        offline_row = offline(path, args, vocab, engine_options)
        print(json.dumps({"offline": offline_row}), flush=True)
        rows = [row for system in args.systems.split(",") for row in serve(path, system, args, vocab, out)]
    (out / "served_bench.json").write_text(json.dumps({"offline": offline_row, "rows": rows}, indent=1))
    print(f"offline: {offline_row['output_tok_s']:,.0f} output tok/s, {offline_row['cpu_us_per_token']:.0f} CPU µs "
          f"per output token ({offline_row['num_seqs']} sequences)")  # fmt: skip
    print(table(offline_row, rows))
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
