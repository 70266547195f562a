"""Build small random-weight checkpoints in the exact Hugging Face on-disk layout.

There is no model hub here, so tests and benchmarks make their own models. The output directory is
what `save_pretrained` would write (config.json, generation_config.json, model.safetensors or
shards + index, tokenizer.json, tokenizer_config.json), so `transformers.AutoModelForCausalLM` and
`AutoTokenizer` load it unchanged and can serve as the outside oracle for our engine.

Contract: the same arguments give the same files. Weights come from `torch.Generator(seed)` in a
fixed name order; the tokenizer is a real byte-level BPE trained deterministically on `_CORPUS`.

Init (see `_init_weights`): linears ~ N(0, 1/fan_in) ("LeCun normal"; std 0.09–0.125 at hidden 64),
embeddings ~ N(0, 1), q/k/v biases ~ N(0, 0.1²), norm weights 1 + 0.1·N(0, 1), lm_head
~ N(0, 4/hidden) so logits have std ≈ 2. Every sub-layer then adds an O(1) update to a unit-scale
residual, so greedy output depends on the context and not only on the last token, and the median
top-1 logit margin is ≈ 0.4 (5th percentile ≈ 0.03), orders of magnitude above float32 noise:
token-exact comparisons against HF are robust (float32 and float64 HF greedy runs agree).
Tied models use embeddings ~ N(0, 1/hidden) instead (see `_init_weights`); they still repeat
tokens more than untied ones, as random tied models do.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from engine.config import DTYPES

ARCHS = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
DEFAULT_TINY: dict[str, Any] = dict(
    arch="qwen3",
    num_layers=2,
    hidden_size=64,
    intermediate_size=128,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
)

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, "<|im_start|>", "<|im_end|>")
# 1021 learned + 3 special = 1024: a multiple of 64, so the default model has no padded vocab rows.
_BPE_VOCAB_SIZE = 1021
_VOCAB_ALIGN = 64
_MODEL_MAX_LENGTH = 32768
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Our own text: prose, dialogue words, code, numbers and several scripts, so the merges cover what
# tests feed the tokenizer and multi-byte characters span several tokens.
_CORPUS = """\
The lighthouse keeper counted the ships every evening. Some nights there were three, some nights none,
and once, during the long winter of the storm, there were forty-two small boats waiting for the tide.
She wrote each number in a green notebook, because numbers, she said, remember what people forget.
When the weather turned, the harbor filled with the smell of salt, diesel and fresh bread from the bakery.
A serving engine takes requests from many users at once. The scheduler decides which sequences run in the
next step; the model computes logits; the sampler picks tokens; the detokenizer turns tokens back into text.
Prefill processes the whole prompt, while decode produces one token per step and reads the key-value cache.
If the cache is full, the scheduler must wait, preempt a request, or reject it with a clear error message.
The system prompt says: you are a helpful assistant. The user asks a question and the assistant answers it.
user: What is the capital of France? assistant: Paris is the capital of France, on the river Seine.
user: Can you write a haiku about autumn? assistant: Red leaves on the path / the wind counts them one by one /
nobody answers.
def fibonacci(n: int) -> list[int]:
    \"\"\"Return the first n Fibonacci numbers.\"\"\"
    values = [0, 1]
    while len(values) < n:
        values.append(values[-1] + values[-2])
    return values[:n]

for i in range(10):
    print(f"step {i}: loss={0.5 ** i:.4f}")

class Request:
    def __init__(self, prompt, max_tokens=16, temperature=0.7):
        self.prompt = prompt
        self.max_tokens = max_tokens

{"model": "tiny", "messages": [{"role": "user", "content": "Hello!"}], "stream": true, "max_tokens": 32}
SELECT name, price FROM products WHERE price > 100 ORDER BY price DESC LIMIT 5;
int main(void) { printf("hello, world\\n"); return 0; }
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 3.14159 2.71828 -17 1e-6 65536 1,000,000 99.9%
Dates and times: 2024-01-15, 12:30:45, March 3rd 1999, the year 2000, version 1.2.3, port 8080, 127.0.0.1.
Le café était très célèbre : les élèves y déjeunaient après l'école, et le garçon répétait « à bientôt ! ».
Der Bäcker öffnet früh; die Straße ist ruhig, und über den Dächern fliegen Vögel. ¿Qué pasó, señor? Mañana.
机器学习是一门研究计算机如何从数据中学习的学科。今天天气很好，我们去公园散步吧。中文分词需要字节级别的编码。
日本語の文章も少し入れておきます。ありがとうございます。한국어 문장도 있습니다. Ελληνικά και русский текст тоже.
Emoji make people smile 😀 🎉 🚀 ❤️ 👍🏽 and sometimes confuse tokenizers 🤖🧠 ✨ — arrows → ← and math ∑ ∞ ≤ ≥ π.
Quick brown foxes jump over lazy dogs; pack my box with five dozen liquor jugs; how vexingly quick daft zebras jump!
In the morning the market opened at seven. Farmers brought apples, pears, cheese, honey and eggs, and children
ran between the stalls asking for samples. An old man played the violin near the fountain, slowly, carefully,
as if each note were a question. By noon the square was crowded; by evening it was quiet again.
Tokens, tokens everywhere: the tokenizer splits words into pieces, the pieces into bytes, and back again.
Streaming output must never print half a character, so a careful decoder waits until the bytes are complete.
"""


def train_tokenizer(size: int | None = None) -> Tokenizer:
    """Train the byte-level BPE on `_CORPUS`; deterministic (same vocab and merges every run).

    ``size``: the tokens in all, specials included. Above the trained 1024, merges of trained pieces
    fill the rest, so a benchmark model of a real vocabulary (151,936 for Qwen3) detokenizes every
    id it samples, and detokenization costs what it costs with a vocabulary of that size."""
    minimum = _BPE_VOCAB_SIZE + len(SPECIAL_TOKENS)
    _check(size is None or size >= minimum, "tokenizer_size", f"must be >= {minimum}, got {size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=0,
        show_progress=False,
        # The full byte alphabet makes every string encodable, even bytes the corpus never shows.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    if size is not None:
        tok = _extend_vocab(tok, size - len(SPECIAL_TOKENS))
    # Added after training so they sit at the end of the vocab, as in Qwen checkpoints.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _extend_vocab(tok: Tokenizer, size: int) -> Tokenizer:
    """The BPE with merges of its own pieces appended (in id order, deterministic) until it has ``size`` tokens."""
    spec = json.loads(tok.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    pieces = sorted(vocab, key=vocab.__getitem__)
    for left, right in itertools.product(pieces, pieces):
        if len(vocab) >= size:
            break
        if left + right not in vocab:
            vocab[left + right] = len(vocab)
            merges.append([left, right])
    return Tokenizer.from_str(json.dumps(spec))


def make_model(
    out_dir: str | Path,
    *,
    arch: str = "qwen3",
    num_layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
    seed: int = 0,
    max_position_embeddings: int = 4096,
    rope_theta: float = 10000.0,
    rope_scaling: dict | None = None,
    max_shard_bytes: int | None = None,
    init_scale: float = 1.0,
    weights: bool = True,
    tokenizer_size: int | None = None,
) -> Path:
    """Write a random-weight `arch` checkpoint plus tokenizer into `out_dir`; return its path.

    head_dim None -> hidden_size // num_heads. vocab_size None -> the tokenizer's size rounded up to
    a multiple of 64 (extra rows are zero so the model rarely picks ids the tokenizer cannot decode).
    rope_scaling is written in the legacy top-level form hub checkpoints use, e.g.
    {"rope_type": "llama3", "factor": 8.0, ...}. max_shard_bytes set -> sharded safetensors + index.
    init_scale multiplies the std of every linear, bias and embedding (1.0 = the module docstring's
    init; norms stay 1 + 0.1·N(0, 1)). weights False writes no safetensors: the directory serves an
    engine with ``load_format="dummy"`` (large shapes for benchmarks without writing gigabytes).
    tokenizer_size: see ``train_tokenizer``. Invalid arguments raise ValueError naming the field.
    """
    _check(arch in ARCHS, "arch", f"must be one of {sorted(ARCHS)}, got {arch!r}")
    _check(dtype in DTYPES, "dtype", f"must be one of {sorted(DTYPES)}, got {dtype!r}")
    sizes = {"num_layers": num_layers, "hidden_size": hidden_size, "intermediate_size": intermediate_size}
    sizes |= {"num_heads": num_heads, "num_kv_heads": num_kv_heads}
    for name, value in sizes.items():
        _check(value >= 1, name, f"must be >= 1, got {value}")
    _check(
        num_heads % num_kv_heads == 0,
        "num_kv_heads",
        f"must divide num_heads={num_heads}, got {num_kv_heads}",
    )
    head_dim = head_dim if head_dim is not None else hidden_size // num_heads
    _check(head_dim >= 2 and head_dim % 2 == 0, "head_dim", f"must be even and >= 2 (RoPE), got {head_dim}")
    _check(
        max_shard_bytes is None or max_shard_bytes > 0,
        "max_shard_bytes",
        f"must be > 0, got {max_shard_bytes}",
    )
    _check(init_scale > 0, "init_scale", f"must be > 0, got {init_scale}")

    tok = train_tokenizer(tokenizer_size)
    num_tokens = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size is None:
        vocab_size = -(-num_tokens // _VOCAB_ALIGN) * _VOCAB_ALIGN
    _check(
        vocab_size >= num_tokens,
        "vocab_size",
        f"must be >= the tokenizer's {num_tokens} tokens, got {vocab_size}",
    )
    eos_id, im_end_id = tok.token_to_id(EOS_TOKEN), tok.token_to_id("<|im_end|>")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": [ARCHS[arch]],
        "model_type": arch,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "hidden_act": "silu",
        "attention_bias": arch == "qwen2",  # Qwen2 hard-codes q/k/v bias; the key documents it
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
        # Qwen base checkpoints reuse <|endoftext|> as bos; the tokenizer itself adds no bos.
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
    }
    if arch == "llama":
        config |= {"mlp_bias": False, "pretraining_tp": 1}
    else:
        config |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": num_layers}
    _write_json(out / "config.json", config)
    # Chat models stop on <|im_end|> too; engines read the union of both files.
    generation_config = {"bos_token_id": eos_id, "eos_token_id": [eos_id, im_end_id], "pad_token_id": eos_id}
    _write_json(out / "generation_config.json", generation_config)

    if weights:
        tensors = _init_weights(config, num_tokens, seed, init_scale)
        tensors = {name: t.to(getattr(torch, dtype)).contiguous() for name, t in tensors.items()}
        _save_weights(out, tensors, max_shard_bytes)

    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _MODEL_MAX_LENGTH,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    return out


def _init_weights(config: dict, num_tokens: int, seed: int, scale: float) -> dict[str, torch.Tensor]:
    """Float32 weights for the HF `config` dict, drawn in a fixed name order from `seed`."""
    arch, hidden, inter = config["model_type"], config["hidden_size"], config["intermediate_size"]
    head_dim, vocab_size = config["head_dim"], config["vocab_size"]
    q_size = config["num_attention_heads"] * head_dim
    kv_size = config["num_key_value_heads"] * head_dim
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * (std * scale)

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return normal(out_features, in_features, std=1.0 / math.sqrt(in_features))

    def norm(n: int) -> torch.Tensor:
        # Not exactly 1, so a loader that forgets to apply (or misplaces) a norm weight gets caught.
        return 1.0 + 0.1 * torch.randn(n, generator=gen, dtype=torch.float32)

    # Untied: unit-variance embeddings match the scale of each sub-layer's output, so neither the
    # current token nor the context drowns the other. Tied: the embedding is also the output head, and
    # at unit scale the current token's own row wins every step (the same token forever); at
    # 1/sqrt(hidden) the context dominates and logits get std ≈ 1, like the untied head's.
    tied = config["tie_word_embeddings"]
    embed_std = 1.0 / math.sqrt(hidden) if tied else 1.0
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(vocab_size, hidden, std=embed_std)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(hidden)
        w[p + "self_attn.q_proj.weight"] = linear(q_size, hidden)
        w[p + "self_attn.k_proj.weight"] = linear(kv_size, hidden)
        w[p + "self_attn.v_proj.weight"] = linear(kv_size, hidden)
        if arch == "qwen2":
            w[p + "self_attn.q_proj.bias"] = normal(q_size, std=0.1)
            w[p + "self_attn.k_proj.bias"] = normal(kv_size, std=0.1)
            w[p + "self_attn.v_proj.bias"] = normal(kv_size, std=0.1)
        if arch == "qwen3":
            w[p + "self_attn.q_norm.weight"] = norm(head_dim)
            w[p + "self_attn.k_norm.weight"] = norm(head_dim)
        w[p + "self_attn.o_proj.weight"] = linear(hidden, q_size)
        w[p + "post_attention_layernorm.weight"] = norm(hidden)
        w[p + "mlp.gate_proj.weight"] = linear(inter, hidden)
        w[p + "mlp.up_proj.weight"] = linear(inter, hidden)
        w[p + "mlp.down_proj.weight"] = linear(hidden, inter)
    w["model.norm.weight"] = norm(hidden)
    if not tied:
        w["lm_head.weight"] = normal(vocab_size, hidden, std=2.0 / math.sqrt(hidden))
    # Padded rows (ids the tokenizer lacks) get logit exactly 0 and so almost never win.
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    head[num_tokens:] = 0.0
    return w


def _save_weights(out: Path, weights: dict[str, torch.Tensor], max_shard_bytes: int | None) -> None:
    metadata = {"format": "pt"}  # transformers checks this key when loading safetensors
    if max_shard_bytes is None:
        save_file(weights, str(out / "model.safetensors"), metadata=metadata)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, t in weights.items():
        size = t.numel() * t.element_size()
        # A tensor larger than the limit gets a shard of its own, as in save_pretrained.
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = t
        shard_bytes += size
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, start=1):
        filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / filename), metadata=metadata)
        weight_map |= dict.fromkeys(shard, filename)
    total = sum(t.numel() * t.element_size() for t in weights.values())
    _write_json(
        out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{field}: {message}")
