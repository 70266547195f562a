"""The GPU KV backends' CPU-testable parts: startup errors on a CPU pool, backend mismatch at the
handshake, the CUDA IPC handle's restricted unpickler, a draining receiver (nccl's rule: every
notice is consumed even after an abort), and the ``pdserve up`` device / backend flags.
"""

from __future__ import annotations

import asyncio
import pickle

import grpc
import pytest
import torch
from test_kvtransfer import LAYERS, deadline_in, layout, pool

from kvtransfer import (
    Destination,
    TransferError,
    TransferState,
    check_kv_backend,
    create_receiver,
    create_sender,
    kv_backend_names,
)
from kvtransfer.cuda_common import _IpcUnpickler
from kvtransfer.stream import StreamReceiver
from kvtransfer.tcp import TcpReceiver
from pdserve.cli import build_parser
from pdserve.up import instance_devices, up_instance_args


@pytest.mark.parametrize("backend", ["cuda_ipc", "nccl"])
@pytest.mark.parametrize("make", [create_sender, create_receiver])
def test_gpu_backends_refuse_a_cpu_pool_at_creation(backend, make):
    with pytest.raises(ValueError, match=rf"kv_backend: '{backend}'.*cpu.*--kv-backend tcp"):
        make(backend, layout(), pool(4))


def test_backend_check_at_config_time():
    check_kv_backend("tcp", "cpu")
    check_kv_backend("nccl", "cuda:1")
    check_kv_backend("tcp", "cuda:0", tp=2)
    with pytest.raises(ValueError, match=r"kv_backend: 'cuda_ipc'.*'cpu'.*--kv-backend tcp"):
        check_kv_backend("cuda_ipc", "cpu")
    with pytest.raises(
        ValueError, match=r"kv_backend: unknown kv backend 'rdma' \(known: cuda_ipc, nccl, tcp\)"
    ):
        check_kv_backend("rdma", "cuda:0")
    with pytest.raises(ValueError, match=r"kv_backend: 'nccl' .*shard per rank; use tcp with tp 2"):
        check_kv_backend("nccl", "cuda:0", tp=2)
    assert kv_backend_names() == ("cuda_ipc", "nccl", "tcp")


def test_services_refuse_a_gpu_backend_on_cpu_before_loading_the_model(tiny_model):
    from decode_svc.server import DecodeConfig
    from engine.config import EngineConfig
    from prefill_svc.server import PrefillConfig

    for config in (PrefillConfig, DecodeConfig):
        with pytest.raises(ValueError, match="kv_backend: 'nccl'"):
            config(EngineConfig(model=str(tiny_model)), kv_backend="nccl")


class Served:
    """``receiver`` on a real aio server at a free loopback port, and a tcp sender."""

    def __init__(self, receiver, src=None) -> None:
        self.receiver, self.server = receiver, grpc.aio.server()
        receiver.add_to_server(self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.sender = create_sender("tcp", layout(), src if src is not None else pool(4))

    async def __aenter__(self) -> Served:
        await self.server.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.sender.close()
        await self.server.stop(0)


class _OtherBackend(TcpReceiver):
    backend = "nccl"


def test_handshake_refuses_a_different_backend():
    async def main():
        async with Served(_OtherBackend(layout(), pool(4))) as s:
            with pytest.raises(TransferError) as err:
                await s.sender.connect(s.address, deadline_in(10))
            return err.value

    err = asyncio.run(main())
    assert err.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "receiver/decode runs 'nccl', sender/prefill 'tcp'" in err.message


def test_ipc_handle_unpickler_allows_only_torch_rebuild_arguments():
    # What reduce_tensor passes for a CUDA tensor; its storage class is that of _typed_storage().
    storage_cls = type(torch.empty(0)._typed_storage())
    args = (torch.Tensor, torch.Size([2, 3]), (3, 1), 0, storage_cls, torch.bfloat16, 0, b"h", 12, 0,
            False, b"r", 0, b"e", True)  # fmt: skip
    import io

    assert _IpcUnpickler(io.BytesIO(pickle.dumps(args))).load() == args

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.print is not allowed"):
        _IpcUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()


class DrainingReceiver(TcpReceiver):
    """tcp's data plane with nccl's rule: consume every data message, even after an abort."""

    drains = True

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.consumed: list[tuple[int, bool]] = []  # (layer, written)

    async def on_data(self, state, pending, data) -> None:
        self.consumed.append((data.layer, pending is not None))
        if pending is not None:
            await super().on_data(state, pending, data)


def test_a_draining_receiver_consumes_the_whole_stream_after_an_abort_and_writes_nothing_more():
    src, dst = pool(8, seed=3), pool(8)

    async def main():
        async with Served(DrainingReceiver(layout(), dst), src) as s:
            receiver = s.receiver
            pending = receiver.expect("t", [5, 6], 8, deadline_in(10))
            session = await s.sender.open(Destination(s.address, "t", (5, 6)), [1, 2], 8, deadline_in(10))
            await session.send_layer(0)
            while not receiver.consumed:
                await asyncio.sleep(0.01)
            receiver.abort("t")
            for layer in range(1, LAYERS):
                await session.send_layer(layer)  # not refused early: the receiver drains
            with pytest.raises(TransferError) as err:
                await session.commit(1, None)
            return err.value, await pending.wait(), receiver.consumed, session.drained

    err, result, consumed, drained = asyncio.run(main())
    assert result.state is TransferState.ABORTED and err.code is grpc.StatusCode.ABORTED
    assert consumed == [(0, True)] + [(layer, False) for layer in range(1, LAYERS)]
    assert drained, "the receiver said it consumed the stream (nccl keeps the pair)"
    assert torch.equal(dst.kv_gpu[0, :, [5, 6]], src.kv_gpu[0, :, [1, 2]])
    assert not dst.kv_gpu[1:].any(), "nothing written after the abort"


def test_a_refused_transfer_is_drained_too():
    async def main():
        async with Served(DrainingReceiver(layout(), pool(8)), pool(8, seed=1)) as s:
            receiver = s.receiver
            session = await s.sender.open(Destination(s.address, "unknown", (5,)), [1], 4, deadline_in(10))
            for layer in range(LAYERS):
                await session.send_layer(layer)
            with pytest.raises(TransferError) as err:
                await session.commit(1, None)
            return err.value, receiver.consumed

    err, consumed = asyncio.run(main())
    assert err.code is grpc.StatusCode.NOT_FOUND
    assert consumed == [(layer, False) for layer in range(LAYERS)]


def test_stream_receiver_is_the_base_of_every_backend():
    from kvtransfer.cuda_ipc import CudaIpcReceiver
    from kvtransfer.nccl import NcclReceiver

    assert issubclass(CudaIpcReceiver, StreamReceiver) and issubclass(NcclReceiver, StreamReceiver)
    assert NcclReceiver.drains and not CudaIpcReceiver.drains and not TcpReceiver.drains


def up_args(*argv: str):
    return build_parser().parse_args(["up", *argv])


def test_up_places_prefill_and_decode_on_their_devices_with_the_backend():
    args = up_args("--prefill-device", "cuda:0", "--decode-device", "cuda:1", "--kv-backend", "cuda_ipc")
    prefill, decode = up_instance_args(args, ["--dtype", "auto"])
    assert prefill == [["--dtype", "auto", "--device", "cuda:0", "--kv-backend", "cuda_ipc", "--tp", "1"]]
    assert decode == [["--dtype", "auto", "--device", "cuda:1", "--kv-backend", "cuda_ipc", "--tp", "1"]]
    args = up_args("--num-prefill", "2", "--prefill-device", "cuda:0,cuda:2", "--device", "cuda:3")
    prefill, decode = up_instance_args(args, [])
    assert [p[1] for p in prefill] == ["cuda:0", "cuda:2"] and decode[0][1] == "cuda:3"
    assert up_instance_args(up_args(), [])[0] == [["--device", "cpu", "--kv-backend", "tcp", "--tp", "1"]]
    prefill, decode = up_instance_args(up_args("--kv-after-prefill"), [])
    assert prefill[0][-1] == "--kv-after-prefill" and "--kv-after-prefill" not in decode[0]
    prefill, decode = up_instance_args(up_args("--decode-tp", "2"), [])
    assert prefill[0][-2:] == ["--tp", "1"] and decode[0][-2:] == ["--tp", "2"]


def test_up_refuses_bad_device_and_backend_combinations_before_starting_anything():
    with pytest.raises(ValueError, match="--kv-backend: cuda_ipc cannot serve a tensor-parallel decode"):
        args = up_args(
            "--kv-backend", "cuda_ipc", "--device", "cuda:0", "--decode-device", "cuda:1", "--decode-tp", "2"
        )
        up_instance_args(args, [])
    with pytest.raises(ValueError, match="--prefill-tp: must be >= 1"):
        up_instance_args(up_args("--prefill-tp", "0"), [])
    with pytest.raises(ValueError, match="nccl needs prefill and decode on different GPUs, both use cuda:0"):
        up_instance_args(up_args("--kv-backend", "nccl", "--device", "cuda:0"), [])
    args = up_args("--kv-backend", "nccl", "--num-prefill", "2", "--prefill-device", "cuda:0,cuda:1",
                   "--decode-device", "cuda:1")  # fmt: skip
    with pytest.raises(ValueError, match="both use cuda:1"):
        up_instance_args(args, [])
    # colocated: no prefill instance, so nothing about prefill is checked
    assert up_instance_args(up_args("--num-prefill", "0", "--prefill-tp", "0"), [])[0] == []
    with pytest.raises(ValueError, match=r"kv_backend: 'nccl'.*'cpu'"):
        up_instance_args(up_args("--kv-backend", "nccl", "--prefill-device", "cuda:0"), [])
    with pytest.raises(ValueError, match="--decode-device: 'cuda:0,cuda:1' names 2 devices for 3"):
        instance_devices("--decode-device", "cuda:0,cuda:1", "cpu", 3)


def test_up_with_a_gpu_backend_on_cpu_exits_with_the_error(capsys):
    from pdserve.cli import main

    assert main(["up", "--kv-backend", "cuda_ipc"]) == 2
    assert "kv_backend: 'cuda_ipc'" in capsys.readouterr().err


class SettlingReceiver(DrainingReceiver):
    """Records when the stream was settled (nccl: every posted receive completed)."""

    async def settle(self, state) -> None:
        self.consumed.append((-1, False))


def test_a_draining_receiver_settles_before_answering_a_refused_commit():
    async def main():
        async with Served(SettlingReceiver(layout(), pool(8)), pool(8, seed=1)) as s:
            pending = s.receiver.expect("t", [5], 4, deadline_in(10))
            session = await s.sender.open(Destination(s.address, "t", (5,)), [1], 4, deadline_in(10))
            s.receiver.abort("t")
            for layer in range(LAYERS):
                await session.send_layer(layer)
            with pytest.raises(TransferError):
                await session.commit(1, None)
            return s.receiver.consumed, session.drained, (await pending.wait()).state

    consumed, drained, state = asyncio.run(main())
    assert consumed == [(layer, False) for layer in range(LAYERS)] + [(-1, False)]
    assert drained and state is TransferState.ABORTED


class StrictReceiver(TcpReceiver):
    def begin(self, header, pending):
        assert pending is not None, "begin runs only for live transfers when not draining"
        return super().begin(header, pending)


def test_a_non_draining_receiver_refuses_an_unknown_transfer_without_beginning_it():
    async def main():
        async with Served(StrictReceiver(layout(), pool(8)), pool(8, seed=1)) as s:
            session = await s.sender.open(Destination(s.address, "nope", (5,)), [1], 4, deadline_in(10))
            with pytest.raises(TransferError) as err:
                for layer in range(LAYERS):
                    await session.send_layer(layer)
                await session.commit(1, None)
            return err.value

    assert asyncio.run(main()).code is grpc.StatusCode.NOT_FOUND


def test_up_forwards_the_tp_collective_flags(monkeypatch, tmp_path):
    import pdserve.launcher
    from engine.env import Env
    from pdserve.up import _up

    seen = {}

    def fake_up(model, prefill, decode, *rest):
        seen["prefill"], seen["decode"] = prefill, decode
        return 0

    monkeypatch.setattr(pdserve.launcher, "up", fake_up)
    args = build_parser().parse_args(
        ["up", "--model", str(tmp_path), "--no-symmetric-memory", "--tbo-min-batch", "64"]
    )
    assert _up(args, Env(cache_dir=tmp_path, log_level="INFO")) == 0
    for argv in seen["prefill"] + seen["decode"]:
        assert "--no-symmetric-memory" in argv and argv[argv.index("--tbo-min-batch") + 1] == "64"
