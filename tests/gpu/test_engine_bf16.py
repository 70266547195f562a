"""bf16 eager engine on CUDA vs HF transformers: logit error and top-1 agreement (GPU box only).

Teacher-forced: both models see the same token sequence (an HF float32 greedy continuation), so a
single early flip cannot cascade. Our logits come through the real paged path: one extend (prefill)
per sequence, then batched decode steps that read the pool.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import LLM
from engine.make_model import make_model
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
transformers = pytest.importorskip("transformers")

NUM_DECODE = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(
        tmp_path_factory.mktemp("gpu") / "qwen3",
        arch="qwen3",
        num_layers=4,
        hidden_size=256,
        intermediate_size=768,
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        seed=3,
    )


def _hf(path, dtype):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()


def _our_logits(llm: LLM, sequences: list[list[int]], prompt_len: int) -> torch.Tensor:
    """Logits at positions prompt_len-1 .. prompt_len-1+NUM_DECODE: [num_seqs, NUM_DECODE + 1, vocab]."""
    eng = llm.engine
    runner, ps = eng.runner, eng.cfg.page_size
    seqs = []
    rows: list[list[torch.Tensor]] = []
    for i, toks in enumerate(sequences):
        seq = Sequence(f"t{i}", toks[:prompt_len], SamplingParams(), seed=0, max_len=len(toks))
        seq.pages = eng.allocator.alloc(-(-len(toks) // ps))
        batch = ScheduledBatch([seq], [prompt_len], is_decode=False)
        rows.append([runner.forward(runner.prepare(batch))[0]])
        seq.num_computed = prompt_len
        seqs.append(seq)
    for step in range(NUM_DECODE):
        for seq, toks in zip(seqs, sequences, strict=True):
            seq.token_ids.append(toks[prompt_len + step])
        batch = ScheduledBatch(seqs, [1] * len(seqs), is_decode=True)
        logits = runner.forward(runner.prepare(batch))
        for row, lg in zip(rows, logits, strict=True):
            row.append(lg)
        for seq in seqs:
            seq.num_computed += 1
    for seq in seqs:
        eng.allocator.free(seq.pages)
    return torch.stack([torch.stack(r) for r in rows])


def test_bf16_engine_matches_hf_within_bf16_bounds(model_dir):
    torch.manual_seed(0)
    hf32 = _hf(model_dir, torch.float32)
    prompt_len = 37  # crosses page boundaries (page 16)
    prompts = torch.randint(0, hf32.config.vocab_size, (3, prompt_len), device="cuda")
    with torch.no_grad():
        full = hf32.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=NUM_DECODE,
            do_sample=False,
            min_new_tokens=NUM_DECODE,
        )
        positions = slice(prompt_len - 1, prompt_len + NUM_DECODE)
        ref = hf32(full).logits[:, positions].float()
        hf16 = _hf(model_dir, torch.bfloat16)(full).logits[:, positions].float()

    llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3)
    ours = _our_logits(llm, full.tolist(), prompt_len)

    def rel(x):
        return ((x - ref).norm() / ref.norm()).item()

    def top1(x):
        return (x.argmax(-1) == ref.argmax(-1)).float().mean().item()

    print(
        f"rel err: ours {rel(ours):.2e}, hf bf16 {rel(hf16):.2e}; top-1: ours {top1(ours):.3f}, hf bf16 {top1(hf16):.3f}"
    )
    assert not ours.isnan().any()
    assert rel(ours) < max(2 * rel(hf16), 1e-2)
    assert top1(ours) >= min(top1(hf16), 0.98) - 0.03


def test_bf16_engine_generates_on_cuda(model_dir):
    llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3)
    outs = llm.generate(
        ["The lighthouse keeper", "Numbers remember"],
        SamplingParams(temperature=0.7, seed=1, max_tokens=32, ignore_eos=True),
    )
    assert [len(o.token_ids) for o in outs] == [32, 32]
    # The same requests batched alike: a batch of one runs other kernels (the GEMV) than a batch of
    # two, whose last logit bits then differ and may tip a sampled token.
    again = llm.generate(
        ["The lighthouse keeper", "Numbers remember"],
        SamplingParams(temperature=0.7, seed=1, max_tokens=32, ignore_eos=True),
    )
    assert [o.token_ids for o in again] == [o.token_ids for o in outs], "seeded requests repeat on the GPU"


def test_engine_starts_when_step_budget_exceeds_the_context(tmp_path):
    """The startup profile run must respect the context: budget 2048 tokens, context 512."""
    path = make_model(
        tmp_path / "short",
        arch="llama",
        num_layers=2,
        hidden_size=128,
        intermediate_size=256,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=512,
    )
    llm = LLM(
        str(path), device="cuda", dtype="bfloat16", max_num_batched_tokens=2048, gpu_memory_utilization=0.3
    )
    out = llm.generate([list(range(5, 500))], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[
        0
    ]
    assert len(out.token_ids) == 12 and out.finish_reason == "length"


def test_first_batch_after_startup_loads_no_torch_module(model_dir):
    """A fresh process's engine serves its first multi-sequence prefill without importing anything
    more from torch (or sympy / triton): the startup warm-up step has pulled in what torch registers
    lazily behind its varlen attention op, seconds of imports that once stalled the first batch."""
    code = f"""
import sys
from engine import LLM, SamplingParams
llm = LLM({str(model_dir)!r}, device="cuda", dtype="bfloat16", attention_backend="triton", max_num_seqs=8)
before = set(sys.modules)
llm.generate([[1, 2, 3, 4, 5], [6, 7, 8]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
print(sorted(m for m in set(sys.modules) - before if m.split(".")[0] in ("torch", "sympy", "triton")))
"""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert ast.literal_eval(run.stdout.strip().splitlines()[-1]) == []
