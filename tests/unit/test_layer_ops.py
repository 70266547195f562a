"""Which layer ops a model is built with (engine/layers/kernels.py), on the CPU.

The fused Triton kernels themselves are checked in tests/gpu/test_fused_kernels.py; the ``torch``
ops' numerics are held to HF transformers by test_engine_vs_hf.py.
"""

from __future__ import annotations

import pytest

from engine import LLM
from engine.config import EngineConfig
from engine.layers.kernels import LayerOps, create_layer_ops, layer_ops_name


def test_fused_kernels_apply_only_on_cuda():
    assert layer_ops_name(EngineConfig(model="m")) == "torch"
    assert layer_ops_name(EngineConfig(model="m", device="cuda")) == "triton"
    assert layer_ops_name(EngineConfig(model="m", device="cuda:1")) == "triton"
    assert layer_ops_name(EngineConfig(model="m", device="cuda", fused_kernels=False)) == "torch"
    assert create_layer_ops("torch").name == "torch"
    with pytest.raises(ValueError, match=r"unknown layer ops 'cuda' \(known: torch, triton\)"):
        create_layer_ops("cuda")


def test_every_layer_of_a_cpu_model_uses_the_torch_ops(tiny_model):
    runner = LLM(str(tiny_model), kv_cache_bytes=4 << 20, fused_kernels=True).engine.runner
    assert type(runner.layer_ops) is LayerOps
    holders = [m for m in runner.model.modules() if hasattr(m, "ops")]
    # per layer: self_attn, o_proj, mlp, down_proj, 2 norms, q_norm, k_norm; plus the final norm
    # and the LM head
    assert len(holders) == 8 * runner.model_cfg.num_layers + 2
    assert all(m.ops is runner.layer_ops for m in holders)


def test_cli_flag_turns_fused_kernels_off(tiny_model, tmp_path):
    from engine.env import Env
    from pdserve.cli import build_parser
    from pdserve.engine_args import engine_config_from_args

    env = Env(cache_dir=tmp_path, log_level="INFO")
    base = ["generate", "--prompt", "x", "--model", str(tiny_model)]
    assert engine_config_from_args(build_parser().parse_args(base), env).fused_kernels
    assert not engine_config_from_args(
        build_parser().parse_args([*base, "--no-fused-kernels"]), env
    ).fused_kernels
