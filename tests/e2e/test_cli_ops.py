"""The command line's operational edges as a user meets them (real subprocesses, bounded): a hub
id resolved from the local Hugging Face cache (a fake cache in the hub's own snapshot layout), a
clear error when it is absent, and a device this torch cannot use reported in one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120


def pdserve(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pdserve", *args],
        cwd=REPO, env=os.environ | env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip


def fake_hub_cache(root: Path, repo_id: str, model_dir: Path) -> Path:
    """``root`` laid out as huggingface_hub's cache holding ``repo_id`` at one revision: blobs,
    a snapshot of links to them, and refs/main naming the snapshot."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir()
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(model_dir.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return root


def test_a_hub_id_is_served_from_the_local_cache_offline(tmp_path, tiny_model):
    cache = fake_hub_cache(tmp_path / "hub", "acme/tiny-qwen3", tiny_model)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PDSERVE_CACHE_DIR": str(tmp_path / "pd")}
    args = ("generate", "--prompt", "The lighthouse", "--max-tokens", "6", "--ignore-eos")
    from_hub = pdserve(*args, "--model", "acme/tiny-qwen3", env=env)
    from_dir = pdserve(*args, "--model", str(tiny_model), env=env)
    assert from_hub.returncode == 0, from_hub.stderr[-2000:]
    assert from_hub.stdout == from_dir.stdout and from_hub.stdout.strip()


def test_a_hub_id_missing_from_the_cache_is_one_clear_error(tmp_path):
    (tmp_path / "hub").mkdir()
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "PDSERVE_CACHE_DIR": str(tmp_path / "pd")}
    for command in ("generate", "up"):
        extra = ("--prompt", "hi") if command == "generate" else ()
        proc = pdserve(command, "--model", "acme/absent-model", *extra, env=env)
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        assert (
            "--model acme/absent-model: not a directory here and not in the Hugging Face cache" in proc.stderr
        )
        assert str(tmp_path / "hub") in proc.stderr and "hf download acme/absent-model" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_a_cuda_device_on_a_cpu_torch_is_one_line_naming_the_fix(tmp_path, tiny_model):
    env = {"PDSERVE_CACHE_DIR": str(tmp_path / "pd")}
    for args in (
        ("generate", "--model", str(tiny_model), "--prompt", "hi", "--device", "cuda"),
        ("up", "--model", str(tiny_model), "--decode-device", "cuda:1", "--port", "0", "--grpc-port", "0"),
    ):
        proc = pdserve(*args, env=env)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = [line for line in proc.stderr.splitlines() if "error" in line]
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "is a CPU-only build; use --device cpu (or auto)" in lines[0]


def test_help_shows_the_operational_flags_with_defaults():
    out = pdserve("up", "--help", env={}).stdout.split("options:", 1)[1]
    for flag, default in (("--drain-timeout-s", "30.0"), ("--log-stats-interval-s", "10.0"),
                          ("--max-restarts", "5"), ("--restart-window-s", "300.0"), ("--log-format", "text")):  # fmt: skip
        assert flag in out
        section = out.split(flag, 1)[1].split("\n  --", 1)[0]
        assert f"(default: {default})" in " ".join(section.split()), section
