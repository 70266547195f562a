"""Shared fixtures: small random-weight models made once per session (never downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.make_model import make_model

# One config per architecture, covering: q/k norm (qwen3), qkv bias (qwen2), llama3 rope scaling and
# tied embeddings (llama), GQA everywhere.
MODEL_SPECS = {
    "qwen3": dict(
        arch="qwen3",
        num_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
    ),
    "qwen2": dict(
        arch="qwen2", num_layers=2, hidden_size=64, intermediate_size=160, num_heads=4, num_kv_heads=2
    ),
    "llama": dict(
        arch="llama",
        num_layers=3,
        hidden_size=64,
        intermediate_size=128,
        num_heads=8,
        num_kv_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        name: make_model(root / name, seed=i, **spec) for i, (name, spec) in enumerate(MODEL_SPECS.items())
    }


@pytest.fixture(scope="session")
def tiny_model(model_dirs: dict[str, Path]) -> Path:
    return model_dirs["qwen3"]


@pytest.fixture(scope="session")
def deep_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """More layers and width than ``tiny_model``: prefilling a chunk of a few hundred tokens takes
    tens of ms on a CPU, long enough to watch a step's layers complete one by one."""
    return make_model(
        tmp_path_factory.mktemp("deep"), arch="qwen3", num_layers=8, hidden_size=256,
        intermediate_size=512, num_heads=4, num_kv_heads=2, head_dim=64, seed=7,
    )  # fmt: skip
