"""Symmetric-memory all-reduce on two GPUs (GPU box with >= 2 GPUs only).

Two NCCL ranks as processes; each sums random tensors through ``SymmetricAllReduce`` (one-shot
and two-shot sizes, bf16 and fp32) eagerly and replayed from a CUDA graph where both channels
reduce concurrently from two streams, as two-batch overlap runs them. The oracle is the plain NCCL
all-reduce of the same tensors: with two ranks a sum is one addition, so the results are equal
bit for bit.
"""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]

HIDDEN = 4096
ROWS = (1, 8, 64, 256, 512, 2048)  # bf16: 8 KiB .. 16 MiB, both sides of the one-shot limit


def _rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    import torch.distributed as dist

    from engine.distributed import destroy_tp, init_tp

    try:
        device = torch.device("cuda", rank)
        tp = init_tp(rank, 2, f"tcp://127.0.0.1:{port}", device=device, timeout_s=120)
        failures = []
        for dtype in (torch.bfloat16, torch.float32):
            sym = tp.with_symmetric_memory(max(ROWS) * HIDDEN * dtype.itemsize, dtype, device)
            assert sym.symmetric is not None, "symmetric memory is unavailable on this box"
            g = torch.Generator(device=device).manual_seed(rank)
            for rows in ROWS:
                x = torch.randn(rows, HIDDEN, dtype=dtype, device=device, generator=g)
                want = x.clone()
                dist.all_reduce(want)
                got = sym.all_reduce(x.clone())
                if not torch.equal(got, want):
                    failures.append(f"eager {dtype} rows={rows}: max diff {(got - want).abs().max().item()}")
            # In a graph: channel 0 on the capture stream, channel 1 on a side stream, concurrently.
            a = torch.randn(256, HIDDEN, dtype=dtype, device=device, generator=g)
            b = torch.randn(64, HIDDEN, dtype=dtype, device=device, generator=g)
            want_a, want_b = a.clone(), b.clone()
            dist.all_reduce(want_a)
            dist.all_reduce(want_b)
            static_a, static_b = a.clone(), b.clone()
            side = torch.cuda.Stream(device)
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize(device)
            with torch.cuda.graph(graph):
                side.wait_stream(torch.cuda.current_stream())
                sym.all_reduce(static_a, channel=0)
                with torch.cuda.stream(side):
                    sym.all_reduce(static_b, channel=1)
                torch.cuda.current_stream().wait_stream(side)
            for rep in range(3):
                static_a.copy_(a)
                static_b.copy_(b)
                graph.replay()
                torch.cuda.synchronize(device)
                if not (torch.equal(static_a, want_a) and torch.equal(static_b, want_b)):
                    failures.append(f"graph {dtype} replay {rep}: two channels differ from NCCL")
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(failures) or "ok")
        del tp, sym
        destroy_tp()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)


def test_symmetric_all_reduce_equals_nccl(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, port, str(tmp_path)), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        if p.is_alive():
            p.kill()
    reports = [(tmp_path / f"rank{r}.txt").read_text() if (tmp_path / f"rank{r}.txt").exists() else "no report"
               for r in range(2)]  # fmt: skip
    assert reports == ["ok", "ok"], reports
