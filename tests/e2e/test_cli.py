"""The ``pdserve`` command line as a user runs it: real subprocesses, bounded by timeouts.

Oracles: HF transformers loads what ``make-model`` writes and its greedy decoding (no KV cache)
agrees with the engine; ``generate`` prints what the in-process ``LLM`` returns for the same request.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from oracles import hf_greedy

from engine import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 60
PROMPT = "The lighthouse keeper counted the ships"


def pdserve(*args: str, cache_dir: Path) -> subprocess.CompletedProcess[bytes]:
    env = os.environ | {"PDSERVE_CACHE_DIR": str(cache_dir), "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, "-m", "pdserve", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def stdout_text(proc: subprocess.CompletedProcess[bytes]) -> str:
    # bytes, not text=True: universal newlines would turn a generated "\r" into "\n"
    return proc.stdout.decode("utf-8")


@pytest.fixture(scope="module")
def cli_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    out = root / "llama"
    proc = pdserve(
        "make-model", str(out), "--arch", "llama", "--layers", "2", "--hidden", "64", "--heads", "4",
        "--kv-heads", "2", cache_dir=root / "cache",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    assert stdout_text(proc).strip() == str(out)
    return out


def test_make_model_writes_a_checkpoint_hf_loads(cli_llama):
    model = transformers.AutoModelForCausalLM.from_pretrained(cli_llama, dtype=torch.float32)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (2, 64)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    tok = transformers.AutoTokenizer.from_pretrained(cli_llama)
    assert tok.decode(tok(PROMPT)["input_ids"]) == PROMPT


def test_generate_prints_what_the_library_returns(cli_llama, tmp_path):
    proc = pdserve(
        "generate", "--model", str(cli_llama), "--prompt", PROMPT, "--max-tokens", "8",
        "--temperature", "0", cache_dir=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()

    llm = LLM(str(cli_llama), kv_cache_bytes=8 << 20)
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8))[0]
    assert stdout_text(proc).removesuffix("\n") == out.text
    assert f"finish_reason={out.finish_reason}" in proc.stderr.decode()
    # and the in-process result is HF's greedy continuation (up to an EOS, if one came first)
    hf = transformers.AutoModelForCausalLM.from_pretrained(cli_llama, dtype=torch.float32).eval()
    expected = hf_greedy(hf, out.prompt_token_ids, 8)[0]
    assert out.token_ids == expected[: len(out.token_ids)]
    assert len(out.token_ids) == 8 or out.finish_reason == "stop"


def test_generate_without_model_makes_the_embedded_tiny_model(tmp_path):
    proc = pdserve("generate", "--prompt", "x", "--max-tokens", "4", cache_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    model_dir = tmp_path / "models" / "tiny-qwen3"
    assert (model_dir / "config.json").is_file()
    assert (model_dir / "tokenizer.json").is_file()
    assert list(model_dir.glob("*.safetensors"))
    assert "finish_reason=" in proc.stderr.decode()
    # the embedded model is an ordinary HF checkpoint, and the CLI printed its greedy text
    out = LLM(str(model_dir), kv_cache_bytes=8 << 20).generate(
        "x", SamplingParams(temperature=0, max_tokens=4)
    )
    assert stdout_text(proc).removesuffix("\n") == out[0].text


def broken_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose weights file is missing."""
    dst.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("case", ["no such directory", "checkpoint without weights"])
def test_bad_model_is_one_line_on_stderr(cli_llama, tmp_path, case):
    model = tmp_path / "nope" if case == "no such directory" else broken_checkpoint(cli_llama, tmp_path / "b")
    proc = pdserve("generate", "--model", str(model), "--prompt", "hello", cache_dir=tmp_path)
    assert proc.returncode != 0
    assert proc.stdout == b""
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines  # no traceback, no log noise
    assert lines[0].startswith("pdserve generate: error:")
    assert str(model) in lines[0]


def test_invalid_sampling_parameter_is_one_error_line(cli_llama, tmp_path):
    args = ["--model", str(cli_llama), "--prompt", "hello", "--max-tokens", "0"]
    proc = pdserve("generate", *args, cache_dir=tmp_path)
    assert proc.returncode != 0
    assert proc.stdout == b""
    stderr = proc.stderr.decode()
    assert "Traceback" not in stderr
    # the engine may log while starting; the error itself is the last line, naming the field
    assert stderr.strip().splitlines()[-1] == "pdserve generate: error: max_tokens: must be >= 1, got 0"


def test_weightless_model_runs_with_dummy_weights(tmp_path):
    """`make-model --no-weights` + `--load-format dummy`: a large shape for benchmarks without
    writing its weights; the output equals the library's on the same dummy weights."""
    model = tmp_path / "shape"
    made = pdserve(
        "make-model", str(model), "--layers", "2", "--hidden", "64", "--no-weights", cache_dir=tmp_path
    )
    assert made.returncode == 0, made.stderr.decode()
    assert not list(model.glob("*.safetensors"))
    missing = pdserve("generate", "--model", str(model), "--prompt", PROMPT, cache_dir=tmp_path)
    assert missing.returncode != 0 and "safetensors" in missing.stderr.decode()
    proc = pdserve(
        "generate", "--model", str(model), "--load-format", "dummy", "--prompt", PROMPT, "--max-tokens", "6",
        "--temperature", "0", "--ignore-eos", cache_dir=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    llm = LLM(str(model), load_format="dummy", kv_cache_bytes=8 << 20)
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert stdout_text(proc).removesuffix("\n") == out.text


def test_version_and_every_help_work(tmp_path):
    """``--version`` names the installed distribution's version; every subcommand's ``--help`` exits 0
    and shows its defaults (what a user reads before the first run)."""
    from importlib.metadata import version

    proc = pdserve("--version", cache_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert stdout_text(proc).strip() == f"pdserve {version('pdserve')}"
    top = pdserve("--help", cache_dir=tmp_path)
    assert top.returncode == 0
    commands = ("make-model", "generate", "prefill", "decode", "gateway", "up", "bench", "soak", "goodput")
    for command in commands:
        assert command in stdout_text(top)
        proc = pdserve(command, "--help", cache_dir=tmp_path)
        assert proc.returncode == 0, f"{command}: {proc.stderr.decode()}"
        assert "(default:" in stdout_text(proc), f"{command} --help shows no defaults"
