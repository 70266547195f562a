"""The GPU KV transfer backends between two real processes (GPU box with >= 2 GPUs): the sender
(``bench/kv_peer.py``) holds a random bf16 pool on cuda:0, the receiver here on cuda:1.

For ``cuda_ipc`` and ``nccl`` (and ``tcp`` as the reference): concurrent requests with scattered,
non-contiguous source and destination pages, layers sent in a shuffled order, arrive bit-exact and
no other page changes; an abort mid-transfer leaves the later layers unwritten, fails the sender, and
the next transfer works; a deadline mid-transfer fails both sides, and the next transfer works.
Oracle: the sender's pool, rebuilt here from the same seed.
"""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]

from bench.kv_peer import PoolShape, SenderProcess, Transfer, fill_pool  # noqa: E402
from kvtransfer import TransferState, create_receiver  # noqa: E402

SHAPE = PoolShape(num_layers=6, num_pages=64, page_size=16, num_kv_heads=4, head_dim=64)
SEED = 11
SRC, DST = "cuda:0", "cuda:1"


@pytest.fixture(scope="module")
def reference():
    pool = SHAPE.pool(DST)
    fill_pool(pool, SEED)
    return pool.kv_gpu.cpu()  # [layers, 2, pages, page_size, kv_heads, head_dim]


class Receiver:
    def __init__(self, backend: str) -> None:
        self.pool = SHAPE.pool(DST)
        self.receiver = create_receiver(backend, SHAPE.layout(), self.pool)
        self.server = grpc.aio.server()
        self.receiver.add_to_server(self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    def expect(self, t: Transfer, deadline_s: float = 30.0):
        return self.receiver.expect(
            t.transfer_id, list(t.dst_pages), t.num_tokens, time.time_ns() + int(deadline_s * 1e9)
        )


def _check_pages(got_pool, reference, sent: dict[int, int], layers=None) -> None:
    """``got_pool`` holds reference page ``sent[dst]`` at every dst (in ``layers``), zeros elsewhere."""
    got = got_pool.kv_gpu.cpu()
    layers = list(range(SHAPE.num_layers)) if layers is None else layers
    for dst, src in sent.items():
        for layer in layers:
            assert torch.equal(got[layer, :, dst], reference[layer, :, src]), (
                f"layer {layer}: destination page {dst} != source page {src}"
            )
    mask = torch.zeros(SHAPE.num_layers, SHAPE.num_pages, dtype=torch.bool)
    for dst in sent:
        mask[layers, dst] = True
    stray = got.transpose(1, 2)[~mask]  # [pages elsewhere, 2, page_size, kv_heads, head_dim]
    assert not stray.any(), (
        f"{int(stray.ne(0).flatten(1).any(1).sum())} (layer, page) pairs written that were not sent"
    )


@pytest.mark.parametrize("backend", ["cuda_ipc", "nccl", "tcp"])
def test_two_processes_move_scattered_pages_bit_exact_and_survive_abort_and_deadline(backend, reference):
    rng = random.Random(backend)
    sender = SenderProcess(backend, SRC, SHAPE, SEED)

    async def main() -> None:
        rx = Receiver(backend)
        await rx.server.start()
        try:
            # 1. three concurrent requests, scattered pages, shuffled layer order
            src_all, dst_all = (
                rng.sample(range(1, SHAPE.num_pages), 30),
                rng.sample(range(1, SHAPE.num_pages), 30),
            )
            sizes, transfers, sent = (3, 7, 12), [], {}
            for i, n in enumerate(sizes):
                lo = sum(sizes[:i])
                src, dst = tuple(src_all[lo : lo + n]), tuple(dst_all[lo : lo + n])
                layers = tuple(rng.sample(range(SHAPE.num_layers), SHAPE.num_layers))
                transfers.append(
                    Transfer(rx.address, f"r{i}", src, dst, n * SHAPE.page_size - 5, layers=layers)
                )
                sent |= dict(zip(dst, src, strict=True))
            pendings = [rx.expect(t) for t in transfers]
            outcomes = await sender.run(transfers)
            assert all(o.ok for o in outcomes), [(o.code, o.message) for o in outcomes]
            results = [await p.wait() for p in pendings]
            assert all(r.state is TransferState.DONE and r.first_token == 7 for r in results), results
            _check_pages(rx.pool, reference, sent)

            # 2. abort mid-transfer: layers after the abort never land; the sender fails
            rx.pool.kv_gpu.zero_()
            t = Transfer(rx.address, "abort", (5, 9, 2), (40, 33, 61), 40, layer_delay_s=0.3)
            pending = rx.expect(t)
            run = asyncio.ensure_future(sender.run([t]))
            while pending.num_bytes == 0:  # the first layer arrived
                await asyncio.sleep(0.01)
            rx.receiver.abort(t.transfer_id)
            (outcome,) = await run
            assert not outcome.ok and outcome.code in ("ABORTED", "NOT_FOUND"), outcome
            assert (await pending.wait()).state is TransferState.ABORTED
            if DST.startswith("cuda"):
                torch.cuda.synchronize(DST)
            got = rx.pool.kv_gpu.cpu()
            assert not got[1:].any(), "layers sent after the abort were written"

            # 3. a deadline mid-transfer: both sides fail with DEADLINE_EXCEEDED
            rx.pool.kv_gpu.zero_()
            t = Transfer(rx.address, "late", (3, 4), (10, 11), 20, deadline_s=1.0, layer_delay_s=0.4)
            pending = rx.expect(t, deadline_s=1.0)
            (outcome,) = await sender.run([t])
            assert not outcome.ok and outcome.code == "DEADLINE_EXCEEDED", outcome
            result = await pending.wait()
            assert result.state is not TransferState.DONE

            # 4. the pair still works (nccl: after a graceful abort, or a new pair after the deadline)
            rx.pool.kv_gpu.zero_()
            t = Transfer(rx.address, "after", (8, 1), (2, 50), 30)
            pending = rx.expect(t)
            (outcome,) = await sender.run([t])
            assert outcome.ok, outcome
            assert (await pending.wait()).state is TransferState.DONE
            _check_pages(rx.pool, reference, {2: 8, 50: 1})
            assert rx.receiver.num_pending == 0
        finally:
            await rx.server.stop(0)

    try:
        asyncio.run(main())
    finally:
        sender.stop()
