"""Served against offline on one GPU: what ``pdserve up`` delivers to a load tool, next to what the
engine makes offline on the same workload.

    python -m bench.served_bench --shape qwen3-0.6b --systems colocated,1p1d --concurrency 1,16,64,256 --out runs

1. A model directory of the shape's config, a tokenizer of the model's vocabulary size (so every
   sampled id detokenizes at a real vocabulary's cost) and ``--load-format dummy`` weights.
2. Offline: ``LLM.generate`` over the largest concurrency's workload (prompt and output lengths
   uniform in ``[--min-len, --max-len]``, ``ignore_eos``) after a warm-up run: output tok/s.
3. Each system started with ``pdserve up`` and the engine flags a user gets by default (plus
   ``--engine-flags``): ``colocated`` (``--num-prefill 0``) and ``1p1d`` (one prefill and one decode
   on the same GPU, KV over ``cuda_ipc``). At each concurrency, ``pdserve bench``'s load generator
   (REST, streaming) sends ``2 x concurrency`` requests (at least 4) of the same length ranges:
   output tok/s, TTFT and TPOT p50/p99, and the process CPU time each child spent per output token.

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
from engine.make_model import make_model
from pdserve.loadtest.load_test import LoadTestConfig, build_workload, run

SYSTEMS = {
    "colocated": ["--num-prefill", "0"],
    "1p1d": ["--kv-backend", "cuda_ipc", "--gpu-memory-utilization", "0.4"],
}


def model_dir(root: Path, shape: str, layers: int | None) -> Path:
    path = make_model(root / shape, vocab_size=VOCAB, tokenizer_size=VOCAB, weights=False)
    cfg = json.loads((path / "config.json").read_text())
    cfg |= SHAPES[shape] | ({"num_hidden_layers": layers} if layers else {}) | {"max_position_embeddings": 40960, "torch_dtype": "bfloat16", "dtype": "bfloat16",
                            "rope_theta": 1000000.0}  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def workload(args: argparse.Namespace, concurrency: int, seed: int = 0) -> LoadTestConfig:
    lens = dict(input_len_min=args.min_len, input_len_max=args.max_len, output_len_min=args.min_len,
                output_len_max=args.max_len)  # fmt: skip
    return LoadTestConfig(
        num_requests=max(4, 2 * concurrency), max_concurrency=concurrency, vocab_low=0, vocab_high=VOCAB - 8,
        seed=seed, progress=False, request_timeout_s=600, **lens,
    )  # fmt: skip


def offline(path: Path, args: argparse.Namespace, engine_options: dict) -> dict:
    from engine import LLM, SamplingParams

    def params(specs):
        return [SamplingParams(temperature=0, max_tokens=s.max_tokens, ignore_eos=True) for s in specs]

    biggest = max(args.concurrency)
    with LLM(str(path), dtype="bfloat16", load_format="dummy", **engine_options) as llm:
        warm = build_workload(workload(args, biggest, seed=1))[: biggest // 2 or 1]
        llm.generate([s.prompt for s in warm], params(warm))
        specs = build_workload(workload(args, biggest))[:biggest]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        outs = llm.generate([s.prompt for s in specs], params(specs))
        elapsed = time.perf_counter() - start
        config = {k: str(v) for k, v in vars(llm.engine.cfg).items()}
    num_out = sum(len(o.token_ids) for o in outs)
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"num_seqs": len(specs), "output_tokens": num_out, "seconds": elapsed,
            "output_tok_s": num_out / elapsed, "engine_config": config}  # fmt: skip


class System:
    """``pdserve up`` as a child process; its children found by their command lines."""

    def __init__(self, path: Path, flags: list[str], log: Path) -> None:
        cmd = [sys.executable, "-m", "pdserve", "up", "--model", str(path), "--load-format", "dummy",
               "--dtype", "bfloat16", "--port", "0", "--grpc-port", "0", *flags]  # fmt: skip
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

    def cpu_seconds(self) -> dict[str, float]:
        """Process CPU time (user + system) of each instance and the gateway, by role (Linux /proc)."""
        out: dict[str, float] = {}
        tick = os.sysconf("SC_CLK_TCK")
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
            except OSError:  # exited while we looked
                continue
            if int(fields[1]) != self.proc.pid:  # fields[1]: the parent's pid
                continue
            role = next((a.decode() for a in argv if a in (b"prefill", b"decode", b"gateway")), None)
            if role:
                out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        return out

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def serve(path: Path, system: str, args: argparse.Namespace, out: Path) -> list[dict]:
    sut = System(path, SYSTEMS[system] + args.engine_flags.split(), out / f"{system}.up.log")
    rows = []
    try:
        base_url = sut.wait_up(args.start_timeout_s)
        warm = workload(args, 8, seed=1)
        asyncio.run(run(LoadTestConfig(**{**vars(warm), "base_url": base_url, "num_requests": 16})))
        for concurrency in args.concurrency:
            cfg = LoadTestConfig(**{**vars(workload(args, concurrency)), "base_url": base_url})
            before, driver_before = sut.cpu_seconds(), time.process_time()
            summary, records, _ = asyncio.run(run(cfg))
            after, driver_after = sut.cpu_seconds(), time.process_time()
            num_out = sum(r.output_tokens for r in records if r.success)
            cpu_us = {role: 1e6 * (after[role] - before.get(role, 0.0)) / max(num_out, 1) for role in after}
            cpu_us["load_tool"] = 1e6 * (driver_after - driver_before) / max(num_out, 1)
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
        "--layers", type=int, default=None, help="override the shape's layer count (a CPU smoke run)"
    )
    p.add_argument("--systems", default="colocated,1p1d")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 256])
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--engine-flags", default="", help="extra flags for pdserve up (e.g. '--device cuda')")
    p.add_argument("--offline-options", default="{}", help="JSON engine options for the offline LLM")
    p.add_argument("--start-timeout-s", type=float, default=300)
    p.add_argument("--out", default=os.environ.get("OUT", "runs"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(Path(tmp), args.shape, args.layers)
        offline_row = offline(path, args, json.loads(args.offline_options))
        print(json.dumps({"offline": offline_row}), flush=True)
        rows = [row for system in args.systems.split(",") for row in serve(path, system, args, out)]
    (out / "served_bench.json").write_text(json.dumps({"offline": offline_row, "rows": rows}, indent=1))
    print(f"offline: {offline_row['output_tok_s']:,.0f} output tok/s ({offline_row['num_seqs']} sequences)")
    print(table(offline_row, rows))
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
