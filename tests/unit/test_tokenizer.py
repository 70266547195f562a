"""Our Tokenizer agrees with transformers.AutoTokenizer on the same directory: ids, text, chat prompts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jinja2
import pytest
import tokenizers

from engine.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world!",
    "The lighthouse keeper counted 42 ships on 2024-01-15.",
    "Le café était très célèbre. Der Bäcker öffnet früh. ¿Qué pasó?",
    "机器学习是一门学科。日本語の文章。한국어",
    "Emoji 😀🎉🚀 and skin tones 👍🏽, ZWJ 👩‍💻, arrows → ≤ ∞",
    "def f(x):\n    return x ** 2  # square\n\n\tTabbed\r\nCRLF",
    "   leading and trailing spaces   ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "",
    "zebra quokka xylophone, unseen words and bytes \x00\x7f",
]
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France? Café 中文 😀"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Germany?"},
]


@pytest.fixture(scope="module")
def model_dir(model_dirs) -> Path:
    return model_dirs["qwen3"]


@pytest.fixture(scope="module")
def ours(model_dir) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def hf(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_hf(ours, hf, text):
    assert ours.encode(text) == hf.encode(text)
    assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_hf_and_round_trips(ours, hf, text):
    ids = ours.encode(text)
    assert ours.decode(ids, skip_special_tokens=False) == text
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(ours, hf, add_generation_prompt):
    text = ours.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(
        MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    ids = ours.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=True)
    expected = hf.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == (
        expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    )
    if add_generation_prompt:
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_special_tokens_and_eos_ids(ours, hf):
    endoftext, im_end = hf.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    # config.json names <|endoftext|>; generation_config.json adds <|im_end|> for chat.
    assert ours.eos_token_ids == {endoftext, im_end}
    assert ours.pad_token_id == hf.pad_token_id == endoftext
    assert ours.bos_token_id is None and hf.bos_token_id is None
    assert ours.vocab_size == len(hf)
    assert ours.all_special_ids == set(hf.all_special_ids)
    assert ours.id_to_token(im_end) == "<|im_end|>" and ours.token_to_id("<|im_end|>") == im_end


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_bos_from_add_bos_token_or_post_processor_is_added_once(model_dir, tmp_path):
    """Llama-2-style dirs say add_bos_token AND have a tokenizer.json post-processor that adds bos:
    exactly one bos, as HF gives. transformers 5 ignores add_bos_token when tokenizer.json exists (v4's
    LlamaTokenizerFast honoured it); we honour it, so a dir with only the flag still gets its bos."""
    path = copy_dir(model_dir, tmp_path / "bos")
    edit_json(path / "tokenizer_config.json", bos_token="<|im_start|>", add_bos_token=True)
    ours = Tokenizer.from_dir(path)
    bos = ours.bos_token_id
    assert bos is not None
    assert ours.encode("hi") == [bos, *ours.encode("hi", add_special_tokens=False)]
    assert bos not in ours.encode("hi", add_special_tokens=False)

    backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
    )
    backend.save(str(path / "tokenizer.json"))
    ours, hf = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    for text in ("hi", "café 中文", ""):
        assert ours.encode(text) == hf.encode(text) == [bos, *hf.encode(text, add_special_tokens=False)]


def test_eos_ids_union_of_all_sources(model_dir, tmp_path):
    path = copy_dir(model_dir, tmp_path / "eos")
    edit_json(path / "config.json", eos_token_id=[5, 6])
    edit_json(path / "generation_config.json", eos_token_id=7)
    ours = Tokenizer.from_dir(path)
    assert ours.eos_token_ids == {5, 6, 7, ours.token_to_id("<|endoftext|>")}
    (path / "generation_config.json").unlink()
    assert Tokenizer.from_dir(path).eos_token_ids == {5, 6, ours.token_to_id("<|endoftext|>")}


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_missing_file_names_the_path(model_dir, tmp_path, name):
    path = copy_dir(model_dir, tmp_path / "missing")
    (path / name).unlink()
    with pytest.raises(FileNotFoundError, match=str(path / name)):
        Tokenizer.from_dir(path)


def test_no_chat_template_is_a_value_error(model_dir, tmp_path):
    path = copy_dir(model_dir, tmp_path / "notemplate")
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="chat_template"):
        Tokenizer.from_dir(path).apply_chat_template(MESSAGES)


def test_template_features_match_hf(model_dir, tmp_path):
    """chat_template.jinja wins over the config key; tojson does not HTML-escape; kwargs reach the
    template; raise_exception raises."""
    path = copy_dir(model_dir, tmp_path / "jinja")
    template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
        "{{ m['role'] }}: {{ m | tojson }}\n{% endfor %}"
        "{% if tools is not none %}{{ tools | tojson }}{% endif %}{{ eos_token }}"
        "{% if enable_thinking is defined and not enable_thinking %}<nothink>{% endif %}"
    )
    (path / "chat_template.jinja").write_text(template)
    ours, hf = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "a < b & 'c' → 中"}]
    for kwargs in ({}, {"enable_thinking": False}, {"tools": [{"name": "<x>"}]}):
        expected = hf.apply_chat_template(messages, tokenize=False, **kwargs)
        assert ours.apply_chat_template(messages, add_generation_prompt=False, **kwargs) == expected
    with pytest.raises(jinja2.TemplateError, match="no tools"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])
