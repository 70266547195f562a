"""How much of the KV transfer a prompt's time to first token still pays, through the real services:
prefill on one device, decode on another (``pdserve up``), layer-by-layer sending (the default)
against ``--kv-after-prefill``, per KV backend, for prompts of several lengths.

Each request goes through the gateway's gRPC API with ``max_tokens=2`` and the timing marks of its
last message give: prefill = prefill_done − prefill_started (the prompt's steps), exposed = the
transfer time after the first token (transfer_done − prefill_done: what TTFT pays), and how early
sending began (prefill_done − transfer_started). The goal: cuda_ipc or nccl ≤ 5 % of the
prompt's prefill time. Requests run one at a time (no queueing in the marks); the first of each
length is a warm-up. Model: Qwen3-8B's shape with dummy weights and the embedded tokenizer (prompts
draw ids below 1000) unless ``--model`` names one.

    python -m bench.kv_overlap_bench --backends cuda_ipc,nccl --tokens 1024,4096,16384,32768 --out runs
    python -m bench.kv_overlap_bench --prefill-device cpu --decode-device cpu --backends tcp \
        --tokens 256,1024 --layers 8 --hidden 256 --heads 4 --kv-heads 2 --dtype float32 --chunk 512
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc

from protos import common_pb2, gateway_pb2, gateway_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
UP_TIMEOUT_S = 300


def make_model(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    path = Path(args.model_dir)
    if not (path / "config.json").exists():
        cmd = [sys.executable, "-m", "pdserve", "make-model", str(path), "--layers", str(args.layers),
               "--hidden", str(args.hidden), "--intermediate", str(args.hidden * 3), "--heads", str(args.heads),
               "--kv-heads", str(args.kv_heads), "--head-dim", str(args.hidden // args.heads), "--dtype", args.dtype,
               "--max-position-embeddings", str(max(args.tokens) + 64), "--no-weights"]  # fmt: skip
        subprocess.run(cmd, cwd=REPO, check=True, timeout=300)
    return str(path)


class Up:
    """``pdserve up`` in a process of its own; ``grpc`` is the gateway's public gRPC address."""

    def __init__(self, model: str, args: argparse.Namespace, backend: str, after: bool, log: Path) -> None:
        cmd = [sys.executable, "-m", "pdserve", "up", "--model", model, "--load-format", "dummy",
               "--dtype", args.dtype, "--prefill-device", args.prefill_device, "--decode-device",
               args.decode_device, "--device", args.prefill_device, "--kv-backend", backend, "--port", "0",
               "--grpc-port", "0", "--max-model-len", str(max(args.tokens) + 64), "--max-num-batched-tokens",
               str(args.chunk), "--no-prefix-cache", *args.engine_args]  # fmt: skip
        cmd += ["--kv-after-prefill"] if after else []
        self.log = log.open("w")
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        self.grpc = self._wait_up()

    def _wait_up(self) -> str:
        deadline = time.monotonic() + UP_TIMEOUT_S
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # ends when the process does
            if '"status": "up"' in line:
                return json.loads(line)["grpc"]
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError(f"pdserve up did not come up (see {self.log.name})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: up stops its instances
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


def one(stub: gateway_pb2_grpc.GatewayServiceStub, prompt: list[int]) -> common_pb2.TimingMarks:
    request = gateway_pb2.GatewayGenerateRequest(
        token_ids=gateway_pb2.TokenIds(ids=prompt),
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
    )
    responses = list(stub.Generate(request, timeout=300))
    assert responses and responses[-1].finish_reason == "length", responses[-1:]
    return responses[-1].timing


def median_ms(marks: list[common_pb2.TimingMarks], end: str, start: str) -> float:
    return statistics.median((getattr(t, end) - getattr(t, start)) / 1e6 for t in marks)


def measure(grpc_address: str, tokens: list[int], repeats: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    with grpc.insecure_channel(grpc_address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        for n in tokens:
            marks = [one(stub, [rng.randrange(5, 1000) for _ in range(n)]) for _ in range(repeats + 1)][1:]
            prefill = median_ms(marks, "prefill_done_ns", "prefill_started_ns")
            exposed = median_ms(marks, "transfer_done_ns", "prefill_done_ns")
            early = median_ms(marks, "prefill_done_ns", "transfer_started_ns")
            rows.append(dict(tokens=n, prefill_ms=prefill, exposed_ms=exposed, exposed_pct=100 * exposed / prefill,
                             sent_before_first_token_ms=early))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="cuda_ipc,nccl", help="comma-separated: tcp, cuda_ipc, nccl")
    p.add_argument("--tokens", default="1024,4096,16384,32768", help="prompt lengths")
    p.add_argument("--repeats", type=int, default=3, help="timed requests per length (after one warm-up)")
    p.add_argument(
        "--modes", default="layerwise,after", help="layerwise (default sending), after (--kv-after-prefill)"
    )
    p.add_argument("--model", default=None, help="HF model directory (default: a dummy-weight shape, below)")
    p.add_argument("--model-dir", default="/tmp/kv-overlap-model", help="where the dummy shape is written")
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--chunk", type=int, default=8192, help="--max-num-batched-tokens (the prefill chunk)")
    p.add_argument("--prefill-device", default="cuda:0")
    p.add_argument("--decode-device", default="cuda:1")
    p.add_argument("--engine-arg", dest="engine_args", action="append", default=[], help="extra `up` flag")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for kv_overlap_bench.json and the logs")
    args = p.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    out = Path(args.out or "runs")
    out.mkdir(parents=True, exist_ok=True)
    model = make_model(args)
    results = []
    print(f"{'backend':9} {'mode':9} {'tokens':>7} {'prefill ms':>11} {'exposed ms':>11} {'% prefill':>9} "
          f"{'sent before 1st token ms':>25}")  # fmt: skip
    for backend in args.backends.split(","):
        for mode in args.modes.split(","):
            up = Up(model, args, backend, mode == "after", out / f"kv_overlap_{backend}_{mode}.log")
            try:
                rows = measure(up.grpc, args.tokens, args.repeats, args.seed)
            finally:
                up.stop()
            for row in rows:
                results.append(dict(backend=backend, mode=mode, **row))
                print(f"{backend:9} {mode:9} {row['tokens']:>7} {row['prefill_ms']:>11.2f} {row['exposed_ms']:>11.2f} "
                      f"{row['exposed_pct']:>9.2f} {row['sent_before_first_token_ms']:>25.2f}", flush=True)  # fmt: skip
    (out / "kv_overlap_bench.json").write_text(json.dumps(dict(args=vars(args), results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
