"""Tensor parallelism on the CPU: N gloo ranks compute what one process computes.

Each rank is a real process with its own ``ModelRunner`` (its slice of every weight, a KV pool of
its share of the kv heads) running a packed EXTEND batch of two sequences (one chunked over a
cached prefix), then greedy DECODE steps fed by its own argmax (``tp_ranks``). The oracle is the
single-process runner on the same checkpoint: float32 logits within 1e-5 relative and the same
tokens, on every rank.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from decode_batches import row_rel_err
from safetensors.torch import load_file, save_file
from tp_ranks import SCHEDULE, greedy_run, run_ranks

from engine.config import ModelConfig
from engine.distributed import TPGroup
from engine.make_model import make_model
from engine.models.llama import LlamaForCausalLM

TOL = 1e-5
SCHEDULE_IS_DECODE = [all(n == 1 for n in step) for step in SCHEDULE]
# One kv head (replicated on every rank), a vocabulary no rank count divides (padded rows) and, added
# by add_attention_biases, biases on q/k/v (sliced per part) and on o (row-parallel: counted once).
MQA_SPEC = dict(arch="llama", num_layers=2, num_heads=4, num_kv_heads=1, vocab_size=1029, seed=11)


def add_attention_biases(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"attention_bias": True}))
    weights = load_file(model_dir / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for name in [n for n in weights if ".self_attn." in n and n.endswith("_proj.weight")]:
        weights[name.replace(".weight", ".bias")] = torch.randn(weights[name].shape[0], generator=g) * 0.5
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def cases(
    model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[str, bool]]:
    """name -> (model dir, dummy weights)."""
    mqa = make_model(tmp_path_factory.mktemp("tp") / "mqa", **MQA_SPEC)
    add_attention_biases(mqa)
    found = {name: (str(path), False) for name, path in model_dirs.items()}
    return found | {
        "mqa-bias-padded-vocab": (str(mqa), False),
        "qwen3-dummy": (str(model_dirs["qwen3"]), True),
        "qwen3-tbo": (str(model_dirs["qwen3"]), False, True),
    }


@pytest.fixture(scope="module")
def tp1(cases) -> dict[str, dict]:
    return {name: greedy_run(case[0], None, *case[1:]) for name, case in cases.items()}


@pytest.fixture(scope="module")
def tp2(cases, tmp_path_factory) -> list[dict[str, dict]]:
    return run_ranks(2, cases, tmp_path_factory.mktemp("tp2"))


def check_ranks_match(ranks: list[dict], want: dict, kv_heads: int) -> None:
    vocab = want["logits"].shape[-1]
    for rank, got in enumerate(ranks):
        assert got["logits"].shape == want["logits"].shape, f"rank {rank}: logits not [steps, 2, {vocab}]"
        for step, (g, w) in enumerate(zip(got["logits"], want["logits"], strict=True)):
            err = row_rel_err(g, w)
            assert err < TOL, f"rank {rank}, step {step}: logits rel err {err:.2e} vs one process"
        assert got["tokens"] == want["tokens"], f"rank {rank}: greedy tokens differ from one process"
        assert got["kv_heads"] == kv_heads, f"rank {rank}: KV pool holds {got['kv_heads']} kv heads"
        assert torch.equal(got["logits"], ranks[0]["logits"]), f"rank {rank} disagrees with rank 0"


def test_two_batch_overlap_equals_one_batch(cases, tp1, tp2):
    """Decode as two micro-batches whose all-reduces interleave (two-batch overlap): one process
    and both TP ranks equal the plain one-process forward."""
    plain, tbo = tp1["qwen3"], tp1["qwen3-tbo"]
    assert any(SCHEDULE_IS_DECODE), "the schedule has decode steps to split"
    for step, (g, w) in enumerate(zip(tbo["logits"], plain["logits"], strict=True)):
        assert row_rel_err(g, w) < TOL, f"step {step}: two micro-batches vs one, one process"
    assert tbo["tokens"] == plain["tokens"]
    kv_heads = ModelConfig.from_dir(cases["qwen3-tbo"][0]).tp_heads(2)[1]
    check_ranks_match([rank["qwen3-tbo"] for rank in tp2], plain, kv_heads)


@pytest.mark.parametrize("case", ["qwen3", "qwen2", "llama", "mqa-bias-padded-vocab", "qwen3-dummy"])
def test_tp2_equals_one_process(case, cases, tp1, tp2):
    kv_heads = ModelConfig.from_dir(cases[case][0]).tp_heads(2)[1]
    check_ranks_match([rank[case] for rank in tp2], tp1[case], kv_heads)
    if case == "mqa-bias-padded-vocab":
        assert tp1[case]["logits"].shape[-1] == MQA_SPEC["vocab_size"]  # no padded column survives


def test_tp4_replicates_kv_heads(cases, tp1, tmp_path):
    """4 ranks over 2 kv heads (llama: 8 q heads, tied embeddings): each kv head on 2 ranks."""
    ranks = run_ranks(4, {"llama": cases["llama"]}, tmp_path)
    check_ranks_match([rank["llama"] for rank in ranks], tp1["llama"], kv_heads=1)


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "tp_size", "want"),
    [
        (8, 2, 1, (8, 2)),
        (8, 2, 2, (4, 1)),
        (8, 2, 4, (2, 1)),
        (8, 2, 8, (1, 1)),
        (4, 4, 2, (2, 2)),
        (4, 1, 4, (1, 1)),
    ],
)
def test_head_split(model_dirs, num_heads, num_kv_heads, tp_size, want):
    cfg = ModelConfig.from_dir(model_dirs["llama"])
    assert dataclasses.replace(cfg, num_heads=num_heads, num_kv_heads=num_kv_heads).tp_heads(tp_size) == want


@pytest.mark.parametrize(
    ("change", "tp_size", "field"),
    [
        (dict(num_heads=4, num_kv_heads=2), 3, "num_attention_heads"),  # 4 q heads over 3 ranks
        (dict(num_heads=12, num_kv_heads=6), 4, "num_key_value_heads"),  # 6 kv heads over 4 ranks
        (dict(num_heads=6, num_kv_heads=2), 3, "num_key_value_heads"),  # 2 kv heads replicated over 3
        (dict(intermediate_size=130), 4, "intermediate_size"),
    ],
)
def test_shapes_that_do_not_split_name_the_field(model_dirs, change, tp_size, field):
    cfg = dataclasses.replace(ModelConfig.from_dir(model_dirs["qwen3"]), **change)
    with pytest.raises(ValueError, match=rf"^{field}: .*tp_size={tp_size}"):
        LlamaForCausalLM(cfg, tp=TPGroup(rank=0, world_size=tp_size))
