"""Which backend each family picks, from capability records: ``auto`` device and attention backend,
KV backends' needs and options, and the checks a service runs before loading a model."""

from __future__ import annotations

import logging

import pytest

from engine.attention import ATTENTION_BACKENDS, resolve_attention_backend
from engine.config import EngineConfig, resolve_device
from kvtransfer import (
    check_kv_backend,
    create_sender,
    kv_backend_caps,
    kv_backend_names,
    receiver_options,
    sender_options,
)


def test_auto_on_this_cpu_host_is_the_cpu_and_torch_native(caplog, tiny_model):
    cfg = EngineConfig(model="m", device="auto", attention_backend="auto")
    assert (cfg.device, cfg.attention_backend) == ("cpu", "torch_native")
    from engine import LLM

    with caplog.at_level(logging.INFO, logger="engine.model_runner"):
        LLM(str(tiny_model), device="auto", attention_backend="auto").close()  # start-up names the choice
    assert any(
        r.getMessage().startswith("device cpu, attention backend torch_native") for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


def test_auto_on_a_cuda_host_is_the_first_gpu_and_triton():
    device = resolve_device("auto", cuda_available=True)
    assert device == "cuda:0"
    assert resolve_attention_backend("auto", device) == "triton"
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("cuda:3", cuda_available=False) == "cuda:3"  # a named device is kept


def test_an_auto_backend_follows_a_named_device():
    assert EngineConfig(model="m", device="cuda:1", attention_backend="auto").attention_backend == "triton"
    assert EngineConfig(model="m", attention_backend="auto").attention_backend == "torch_native"


def test_defaults_and_named_choices_are_kept(caplog):
    with caplog.at_level(logging.INFO, logger="pdserve.engine"):
        cfg = EngineConfig(model="m")
        named = EngineConfig(model="m", device="cuda:0", attention_backend="torch_native")
    assert (cfg.device, cfg.attention_backend) == ("cpu", "torch_native")
    assert (named.device, named.attention_backend) == ("cuda:0", "torch_native")
    assert caplog.records == []  # nothing resolved, nothing logged


def test_a_bad_attention_backend_fails_when_the_config_is_made():
    with pytest.raises(ValueError, match=r"attention_backend: 'triton' runs on cuda, not on device 'cpu'"):
        EngineConfig(model="m", attention_backend="triton")
    with pytest.raises(ValueError, match=r"attention_backend: unknown attention backend 'flash' \(known: "):
        EngineConfig(model="m", attention_backend="flash")


def test_attention_capabilities_match_the_backend_classes():
    from engine.attention.torch_native import TorchNativeBackend

    assert ATTENTION_BACKENDS.caps("torch_native").cuda_graphs is TorchNativeBackend.supports_graphs
    triton_backend = pytest.importorskip("engine.attention.triton_backend", exc_type=ImportError)
    assert ATTENTION_BACKENDS.caps("triton").cuda_graphs is triton_backend.TritonBackend.supports_graphs


def test_kv_backend_capabilities():
    assert kv_backend_names(tensor_parallel=True) == ("tcp",)
    assert kv_backend_names(distinct_devices=True) == ("nccl",)
    assert kv_backend_names(requires_cuda=False) == ("tcp",)
    assert kv_backend_caps("cuda_ipc").requires_cuda
    with pytest.raises(ValueError, match=r"unknown kv backend 'rdma' \(known: cuda_ipc, nccl, tcp\)"):
        kv_backend_caps("rdma")


def test_each_kv_side_gets_only_the_options_it_takes():
    assert sender_options("tcp", tls=None, chunk_delay_s=0.5) == {"tls": None, "chunk_delay_s": 0.5}
    assert sender_options("nccl", tls=None, chunk_delay_s=0.5) == {"tls": None}
    assert receiver_options("nccl", host="10.0.0.2") == {"host": "10.0.0.2"}
    assert receiver_options("tcp", host="10.0.0.2") == {}
    with pytest.raises(
        ValueError, match=r"unknown option 'host' \(allowed: chunk_delay_s, max_chunk_bytes, tls\)"
    ):
        create_sender("tcp", None, None, host="10.0.0.2")


def test_services_refuse_a_tensor_parallel_instance_on_a_gpu_backend(tiny_model):
    from decode_svc.server import DecodeConfig
    from prefill_svc.server import PrefillConfig

    engine = EngineConfig(model=str(tiny_model), device="cuda:0", tp=2)
    for config in (PrefillConfig, DecodeConfig):
        with pytest.raises(ValueError, match=r"kv_backend: 'cuda_ipc' .*use tcp with tp 2"):
            config(engine, kv_backend="cuda_ipc")
        assert config(engine, kv_backend="tcp").kv_backend == "tcp"
    check_kv_backend("tcp", "cpu", tp=2)
