"""Broken checkpoints fail with one clear error that names the file, the tensor and what was expected.

Each test copies the session's tiny Qwen3 checkpoint, breaks one thing the way real downloads and
conversions break, and loads it through the public entry point (``engine.LLM``). The error must be a
single exception (no chained traceback) whose one-line message a user can act on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from engine.loader import ModelLoadError
from engine.models import ARCHITECTURES

WEIGHTS = "model.safetensors"
SMALL_POOL = 1 << 20  # the KV pool is irrelevant here; keep construction cheap


@pytest.fixture
def ckpt(tiny_model: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model that a test may break."""
    return Path(shutil.copytree(tiny_model, tmp_path / "ckpt"))


def load(model_dir: Path) -> LLM:
    return LLM(str(model_dir), kv_cache_bytes=SMALL_POOL)


def edit_weights(model_dir: Path, edit) -> None:
    tensors = load_file(model_dir / WEIGHTS)
    edit(tensors)
    save_file(tensors, str(model_dir / WEIGHTS), metadata={"format": "pt"})


def edit_config(model_dir: Path, edit) -> None:
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


def load_error(model_dir: Path, kind: type[Exception] = ModelLoadError) -> str:
    """Load ``model_dir``, expecting exactly one exception of ``kind``; return its message."""
    with pytest.raises(kind) as info:
        load(model_dir)
    err = info.value
    # One error, not a chain: nothing "during handling of the above exception" for the user to wade through.
    assert err.__cause__ is None
    assert err.__context__ is None or err.__suppress_context__
    message = str(err)
    assert "\n" not in message
    return message


def greedy_tokens(llm: LLM) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    return llm.generate(["The lighthouse keeper"], params)[0].token_ids


def test_intact_copy_loads(ckpt):
    assert len(greedy_tokens(load(ckpt))) == 8


def test_unknown_architecture_lists_the_supported_ones(ckpt):
    edit_config(ckpt, lambda c: c.update(architectures=["MysteryForCausalLM"]))
    message = load_error(ckpt)
    assert str(ckpt / "config.json") in message
    assert "MysteryForCausalLM" in message
    for supported in ARCHITECTURES:
        assert supported in message


def test_missing_tensor_is_named(ckpt):
    name = "model.layers.1.mlp.down_proj.weight"
    edit_weights(ckpt, lambda w: w.pop(name))
    message = load_error(ckpt)
    assert str(ckpt) in message
    assert name in message
    assert "missing" in message


def test_missing_packed_tensor_is_named_as_in_the_checkpoint(ckpt):
    name = "model.layers.0.self_attn.q_proj.weight"
    edit_weights(ckpt, lambda w: w.pop(name))
    message = load_error(ckpt)
    assert name in message


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.2.mlp.down_proj.weight",  # a layer the config does not have
        "model.layers.0.self_attn.q_proj.bias",  # a bias Qwen3 does not have (packed q/k/v path)
    ],
)
def test_unexpected_tensor_is_named(ckpt, name):
    edit_weights(ckpt, lambda w: w.__setitem__(name, torch.zeros(64, 128)))
    message = load_error(ckpt)
    assert str(ckpt / WEIGHTS) in message
    assert name in message
    assert "unexpected" in message


@pytest.mark.parametrize(
    ("name", "expected", "got"),
    [
        ("model.embed_tokens.weight", (1024, 64), (1000, 64)),  # vocab size disagrees with config
        ("model.layers.0.self_attn.o_proj.weight", (64, 128), (128, 64)),  # transposed: same numel
        ("model.layers.0.self_attn.k_proj.weight", (64, 64), (32, 64)),  # one part of packed q/k/v
        ("model.layers.1.mlp.up_proj.weight", (128, 64), (96, 64)),  # one part of packed gate/up
    ],
)
def test_wrong_shape_names_expected_and_got(ckpt, name, expected, got):
    edit_weights(ckpt, lambda w: w.__setitem__(name, torch.zeros(got)))
    message = load_error(ckpt)
    assert str(ckpt / WEIGHTS) in message
    assert name in message
    assert f"expected shape {expected}" in message
    assert f"got {got}" in message


def shard(model_dir: Path, num_shards: int) -> list[str]:
    """Rewrite the checkpoint as ``num_shards`` files plus an index, as save_pretrained does."""
    tensors = load_file(model_dir / WEIGHTS)
    (model_dir / WEIGHTS).unlink()
    names = sorted(tensors)
    files = [f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors" for k in range(num_shards)]
    weight_map = {name: files[i % num_shards] for i, name in enumerate(names)}
    for file in files:
        part = {n: tensors[n] for n in names if weight_map[n] == file}
        save_file(part, str(model_dir / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    return files


def test_sharded_checkpoint_loads_the_same_weights(ckpt, tiny_model):
    shard(ckpt, 3)
    assert greedy_tokens(load(ckpt)) == greedy_tokens(load(tiny_model))


def test_index_naming_a_missing_shard(ckpt):
    files = shard(ckpt, 3)
    (ckpt / files[1]).unlink()
    message = load_error(ckpt)
    assert str(ckpt / "model.safetensors.index.json") in message
    assert files[1] in message


def test_no_config_json(ckpt):
    (ckpt / "config.json").unlink()
    message = load_error(ckpt, FileNotFoundError)
    assert str(ckpt / "config.json") in message


def test_directory_without_weights(ckpt):
    (ckpt / WEIGHTS).unlink()
    message = load_error(ckpt)
    assert str(ckpt) in message
    assert "safetensors" in message


def test_config_missing_a_required_field(ckpt):
    edit_config(ckpt, lambda c: c.pop("hidden_size"))
    message = load_error(ckpt, ValueError)
    assert str(ckpt / "config.json") in message
    assert "hidden_size" in message


def test_config_missing_num_attention_heads(ckpt):
    edit_config(ckpt, lambda c: c.pop("num_attention_heads"))
    message = load_error(ckpt, ValueError)
    assert str(ckpt / "config.json") in message
    assert "num_attention_heads" in message


def test_corrupt_config_json_names_the_file(ckpt):
    (ckpt / "config.json").write_text('{"architectures": ')
    message = load_error(ckpt, ValueError)
    assert str(ckpt / "config.json") in message


def test_truncated_weights_file_names_the_file(ckpt):
    data = (ckpt / WEIGHTS).read_bytes()
    (ckpt / WEIGHTS).write_bytes(data[: len(data) // 2])
    message = load_error(ckpt)
    assert str(ckpt / WEIGHTS) in message
