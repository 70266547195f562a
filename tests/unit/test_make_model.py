"""make_model writes checkpoints that HF transformers loads as-is, deterministically, and whose random
weights give non-degenerate greedy output with margins well above float32 noise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.make_model import DEFAULT_TINY, make_model, train_tokenizer

transformers = pytest.importorskip("transformers")

PROMPTS = ["The lighthouse keeper", "def fibonacci(n):", "Le café 中文", "user: What is 42?"]


def load_hf(path: Path, dtype: torch.dtype = torch.float32):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, output_loading_info=True
    )
    return model.eval(), info


def hf_greedy(model, ids: list[int], num_new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=num_new, min_new_tokens=num_new, do_sample=False
        )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_hf_loads_every_arch_with_no_missing_or_unexpected_keys(model_dirs, arch):
    model, info = load_hf(model_dirs[arch])
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not info["error_msgs"]
    assert type(model).__name__ == {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
        arch, "LlamaForCausalLM"
    )
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == (arch == "qwen2")
    if arch == "qwen3":
        assert attn.q_norm.weight.shape == (model.config.head_dim,)


def test_config_round_trips_through_hf(model_dirs):
    qwen3 = transformers.AutoConfig.from_pretrained(model_dirs["qwen3"])
    assert (qwen3.head_dim, qwen3.num_key_value_heads, qwen3.tie_word_embeddings) == (32, 2, False)
    assert qwen3.vocab_size % 64 == 0 and qwen3.vocab_size >= train_tokenizer().get_vocab_size()

    llama = transformers.AutoConfig.from_pretrained(model_dirs["llama"])
    assert llama.tie_word_embeddings is True
    rope = llama.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == (
        "llama3",
        8.0,
        64,
    )
    # Real hub checkpoints keep the legacy top-level keys; so do we.
    raw = json.loads((model_dirs["llama"] / "config.json").read_text())
    assert raw["rope_scaling"]["rope_type"] == "llama3" and raw["rope_theta"] == 10000.0


def test_tied_model_has_no_lm_head_tensor_and_hf_ties_it(model_dirs):
    assert "lm_head.weight" not in load_file(model_dirs["llama"] / "model.safetensors")
    model, _ = load_hf(model_dirs["llama"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_sharded_checkpoint_loads_with_the_same_weights(tmp_path):
    whole = make_model(tmp_path / "whole", **DEFAULT_TINY)
    sharded = make_model(tmp_path / "sharded", **DEFAULT_TINY, max_shard_bytes=100_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((sharded / f).is_file() for f in files)
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (sharded / "model.safetensors").exists()

    model_whole, _ = load_hf(whole)
    model_sharded, info = load_hf(sharded)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    expected = model_whole.state_dict()
    for name, tensor in model_sharded.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def test_same_arguments_give_identical_files_and_seed_changes_weights(tmp_path):
    a = make_model(tmp_path / "a", **DEFAULT_TINY, seed=3)
    b = make_model(tmp_path / "b", **DEFAULT_TINY, seed=3)
    c = make_model(tmp_path / "c", **DEFAULT_TINY, seed=4)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_tokenizer_training_is_deterministic():
    assert train_tokenizer().to_str() == train_tokenizer().to_str()


def test_bfloat16_checkpoint(tmp_path):
    path = make_model(tmp_path / "bf16", **DEFAULT_TINY, dtype="bfloat16")
    assert {t.dtype for t in load_file(path / "model.safetensors").values()} == {torch.bfloat16}
    assert transformers.AutoConfig.from_pretrained(path).dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_greedy_output_varies_and_survives_float64(model_dirs, arch):
    tok = transformers.AutoTokenizer.from_pretrained(model_dirs[arch])
    model32, _ = load_hf(model_dirs[arch])
    model64, _ = load_hf(model_dirs[arch], torch.float64)
    outputs = []
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        out = hf_greedy(model32, ids, 12)
        # Top-1 margins far above float32 noise: float64 picks exactly the same tokens.
        assert hf_greedy(model64, ids, 12) == out, prompt
        outputs.append(tuple(out))
    assert len(set(outputs)) == len(PROMPTS), "output should depend on the prompt"
    assert max(len(set(o)) for o in outputs) >= 4, "output should not be one token forever"


def test_padded_vocab_rows_are_never_greedy(tmp_path):
    path = make_model(tmp_path / "padded", **DEFAULT_TINY, vocab_size=1088)
    model, _ = load_hf(path)
    num_tokens = train_tokenizer().get_vocab_size()
    assert model.config.vocab_size == 1088
    out = hf_greedy(model, [1, 2, 3, 4], 24)
    assert max(out) < num_tokens


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"arch": "gpt2"}, "arch"),
        ({"dtype": "int8"}, "dtype"),
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"head_dim": 15}, "head_dim"),
        ({"vocab_size": 100}, "vocab_size"),
        ({"num_layers": 0}, "num_layers"),
        ({"max_shard_bytes": 0}, "max_shard_bytes"),
    ],
)
def test_invalid_arguments_name_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        make_model(tmp_path / "bad", **kwargs)


def test_a_tokenizer_of_a_real_vocab_size_decodes_every_id(tmp_path):
    """A benchmark model of a large vocabulary gets a tokenizer of that size: HF loads it, every id
    the model can sample decodes, text encodes as with the default tokenizer, specials stay last."""
    size = 5000
    out = make_model(tmp_path / "m", vocab_size=size, tokenizer_size=size, weights=False)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert len(hf) == size
    assert hf.convert_ids_to_tokens(size - 1) == "<|im_end|>"
    text = "The lighthouse keeper counted the ships"
    assert hf(text)["input_ids"] == train_tokenizer().encode(text).ids
    decoded = hf.batch_decode([[i] for i in range(size)])
    assert all(isinstance(piece, str) for piece in decoded) and sum(map(bool, decoded)) == size
    with pytest.raises(ValueError, match="tokenizer_size"):
        make_model(tmp_path / "small", tokenizer_size=100, weights=False)
