"""kvtransfer: layouts, fingerprints, and the tcp backend over a real gRPC server on loopback.

Oracle: the sender's own pool tensor — the receiver's pages must equal it bit for bit.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch

from engine.kvcache.page_pool import KVPagePool
from engine.make_model import make_model
from kvtransfer import (
    Destination,
    KVLayout,
    TransferError,
    TransferState,
    create_receiver,
    create_sender,
    model_fingerprint,
)
from protos import kvtransfer_pb2, kvtransfer_pb2_grpc

LAYERS, HEADS, DIM, PAGE = 3, 2, 8, 4


def layout(**overrides) -> KVLayout:
    fields = dict(
        model_fingerprint="abc",
        dtype="bfloat16",
        num_layers=LAYERS,
        num_kv_heads=HEADS,
        head_dim=DIM,
        page_size=PAGE,
    )
    return KVLayout(**(fields | overrides))


def pool(num_pages: int, dtype=torch.bfloat16, seed: int | None = None) -> KVPagePool:
    p = KVPagePool(LAYERS, num_pages, PAGE, HEADS, DIM, dtype, "cpu")
    if seed is not None:
        p.kv_gpu.copy_(torch.randn(p.kv_gpu.shape, generator=torch.Generator().manual_seed(seed)))
    return p


def test_layout_mismatch_names_every_field_with_both_values():
    ours, theirs = layout(page_size=8), layout(dtype="float16")
    assert ours.mismatches(theirs) == [
        "dtype: ours='bfloat16' theirs='float16'",
        "page_size: ours=8 theirs=4",
    ]
    assert layout().mismatches(layout()) == []
    assert ours.digest != theirs.digest and layout().digest == layout().digest


def test_fingerprint_tells_checkpoints_of_one_shape_apart(tmp_path):
    spec = dict(arch="qwen3", num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    a, b = make_model(tmp_path / "a", seed=0, **spec), make_model(tmp_path / "b", seed=1, **spec)
    assert model_fingerprint(a) == model_fingerprint(a)
    assert model_fingerprint(a) != model_fingerprint(b)
    # Dummy weights (seeded random, no files read) are not the checkpoint's: a peer loading the
    # files must not pair with one running dummy weights of the same config.
    assert model_fingerprint(a, "dummy") != model_fingerprint(a)
    weightless = make_model(tmp_path / "c", seed=0, weights=False, **spec)
    assert not list(weightless.glob("*.safetensors"))
    assert model_fingerprint(weightless, "dummy") == model_fingerprint(a, "dummy")


class Pair:
    """A receiver on a real aio server at a free loopback port and a sender pointed at it."""

    def __init__(
        self, recv_layout: KVLayout, send_layout: KVLayout, recv_pool, send_pool, **sender_opts
    ) -> None:
        self.receiver = create_receiver("tcp", recv_layout, recv_pool)
        self.sender = create_sender("tcp", send_layout, send_pool, **sender_opts)
        self.server = grpc.aio.server()
        self.receiver.add_to_server(self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    async def __aenter__(self) -> Pair:
        await self.server.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.sender.close()
        await self.server.stop(0)


def deadline_in(seconds: float) -> int:
    return time.time_ns() + int(seconds * 1e9)


async def send(
    pair: Pair, src_pool: KVPagePool, src_pages: list[int], dest: Destination, num_tokens: int
) -> int:
    async with await pair.sender.open(dest, src_pages, num_tokens, deadline_in(10)) as session:
        for layer in reversed(range(LAYERS)):  # any order
            await session.send_layer(layer)
        return await session.commit(42, None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tcp_moves_pages_bit_exact_in_chunks(dtype):
    name = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    src, dst = pool(20, dtype, seed=1), pool(30, dtype)
    src_pages, dst_pages = [3, 7, 1, 12, 5], [29, 4, 17, 8, 22]

    async def main():
        # ~2 pages per chunk: each layer crosses in several messages
        async with Pair(
            layout(dtype=name),
            layout(dtype=name),
            dst,
            src,
            max_chunk_bytes=2 * PAGE * HEADS * DIM * 2 * dtype.itemsize,
        ) as pair:
            pending = pair.receiver.expect("t1", dst_pages, 19, deadline_in(10))
            num_bytes = await send(
                pair, src, src_pages, Destination(pair.address, "t1", tuple(dst_pages)), 19
            )
            result = await pending.wait()
            return num_bytes, result

    num_bytes, result = asyncio.run(main())
    assert result.state is TransferState.DONE and result.first_token == 42
    assert num_bytes == result.num_bytes == LAYERS * 2 * len(src_pages) * PAGE * HEADS * DIM * dtype.itemsize
    assert torch.equal(dst.kv_gpu[:, :, dst_pages], src.kv_gpu[:, :, src_pages])
    untouched = [p for p in range(30) if p not in dst_pages]
    assert not dst.kv_gpu[:, :, untouched].any()


def test_handshake_mismatch_fails_before_any_data():
    async def main():
        async with Pair(layout(page_size=8), layout(), pool(4), pool(4)) as pair:
            pending = pair.receiver.expect("t", [1], 3, deadline_in(10))
            with pytest.raises(TransferError) as err:
                await pair.sender.open(Destination(pair.address, "t", (1,)), [1], 3, deadline_in(10))
            assert pending.state is TransferState.PENDING
            pair.receiver.abort("t")
            return err.value

    err = asyncio.run(main())
    assert err.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "page_size: ours=8 theirs=4" in err.message


def test_a_burst_of_connects_makes_one_handshake():
    """Each handshake re-creates a backend's data plane (an NCCL pair): requests arriving together
    must share the one in flight, not race their own."""

    async def main():
        async with Pair(layout(), layout(), pool(4), pool(4)) as pair:
            seen = []
            real = pair.receiver.on_handshake

            async def counting(peer):
                seen.append(peer.sender_id)
                await asyncio.sleep(0.05)  # a slow data-plane setup widens the window
                return await real(peer)

            pair.receiver.on_handshake = counting
            await asyncio.gather(*(pair.sender.connect(pair.address, deadline_in(10)) for _ in range(8)))
            await pair.sender.connect(pair.address, deadline_in(10))
            return seen

    assert len(asyncio.run(main())) == 1


def test_receiver_aborted_mid_transfer_ends_both_sides_aborted():
    src, dst = pool(8, seed=2), pool(8)

    async def main():
        async with Pair(layout(), layout(), dst, src, chunk_delay_s=0.2) as pair:
            pending = pair.receiver.expect("t", [1, 2], 8, deadline_in(10))
            session = await pair.sender.open(
                Destination(pair.address, "t", (1, 2)), [1, 2], 8, deadline_in(10)
            )
            await session.send_layer(0)
            pair.receiver.abort("t")
            with pytest.raises(TransferError) as err:
                for layer in range(1, LAYERS):
                    await session.send_layer(layer)
                await session.commit(1, None)
            return err.value, await pending.wait()

    err, result = asyncio.run(main())
    assert result.state is TransferState.ABORTED
    assert err.code in (grpc.StatusCode.ABORTED, grpc.StatusCode.NOT_FOUND)


def test_wait_is_bounded_by_the_deadline():
    async def main():
        async with Pair(layout(), layout(), pool(4), pool(4)) as pair:
            pending = pair.receiver.expect("never", [1], 2, deadline_in(0.2))
            start = time.monotonic()
            result = await pending.wait()
            return result, time.monotonic() - start, pair.receiver.num_pending

    result, waited, num_pending = asyncio.run(main())
    assert result.state is TransferState.FAILED and result.error.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert waited < 2 and num_pending == 0


async def push(address: str, chunks: list[kvtransfer_pb2.KVChunk]) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await kvtransfer_pb2_grpc.KVTransferStub(channel).PushKV(iter(chunks), timeout=10)
    return err.value


def header(transfer_id="t", digest=None, num_pages=2, num_tokens=8):
    h = kvtransfer_pb2.KVHeader(
        transfer_id=transfer_id,
        layout_digest=digest or layout().digest,
        num_pages=num_pages,
        num_tokens=num_tokens,
    )
    return kvtransfer_pb2.KVChunk(header=h)


def data(layer, first, n):
    kv = bytes(n * PAGE * HEADS * DIM * 2 * 2)
    return kvtransfer_pb2.KVChunk(
        data=kvtransfer_pb2.KVData(layer=layer, first_page=first, num_pages=n, kv=kv)
    )


COMMIT = kvtransfer_pb2.KVChunk(commit=kvtransfer_pb2.KVCommit(first_token_id=1))


@pytest.mark.parametrize(
    ("chunks", "code", "words"),
    [
        ([header(transfer_id="nope")], grpc.StatusCode.NOT_FOUND, "not expected"),
        ([header(digest="0" * 16)], grpc.StatusCode.FAILED_PRECONDITION, "digest"),
        ([header(num_pages=3)], grpc.StatusCode.INVALID_ARGUMENT, "reserved"),
        ([data(0, 0, 1)], grpc.StatusCode.INVALID_ARGUMENT, "header"),
        ([header(), data(0, 0, 2), data(0, 1, 1)], grpc.StatusCode.INVALID_ARGUMENT, "twice"),
        ([header(), data(0, 1, 2)], grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
        ([header(), data(LAYERS, 0, 1)], grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
        (
            [header(), *(data(layer, 0, 2) for layer in range(LAYERS - 1)), COMMIT],
            grpc.StatusCode.INVALID_ARGUMENT,
            "unsent",
        ),
        ([header(), data(0, 0, 2)], grpc.StatusCode.ABORTED, "before committing"),
    ],
)
def test_receiver_rejects_malformed_streams_and_fails_the_transfer(chunks, code, words):
    async def main():
        async with Pair(layout(), layout(), pool(8), pool(8)) as pair:
            pending = pair.receiver.expect("t", [1, 2], 8, deadline_in(10))
            err = await push(pair.address, chunks)
            state = pending.state
            pair.receiver.abort("t")
            return err, state

    err, state = asyncio.run(main())
    assert err.code() is code and words in err.details()
    if (
        chunks[0].header.transfer_id == "t"
        and chunks[0].header.layout_digest == layout().digest
        and chunks[0].header.num_pages == 2
    ):
        assert state is TransferState.FAILED
