"""The soak tool, short: a gateway kept saturated for a few seconds — no errors, every instance
idle again afterwards, resident memory flat (growth bounded)."""

from __future__ import annotations

import json
import subprocess
import sys

from services import REPO, Service, start_all

ENGINE = ("--page-size", "4", "--kv-cache-mib", "16")


def test_short_soak_has_no_errors_and_no_leaks(tiny_model, tmp_path):
    prefill, decode = start_all([("prefill", tiny_model, ENGINE), ("decode", tiny_model, ENGINE)], tmp_path)
    gw = Service(
        "gateway", tiny_model, "--prefill", prefill.address, "--decode", decode.address, log_dir=tmp_path
    )
    try:
        gw.wait_ready()
        cmd = [sys.executable, "-m", "pdserve", "soak", "--base-url", gw.http_url, "--duration-s", "12",
               "--warmup-s", "4", "--concurrency", "8", "--max-rss-growth-pct", "25", "--out-dir", str(tmp_path)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=120, check=False)
        result = json.loads((tmp_path / "soak.json").read_text())
        assert proc.returncode == 0, proc.stdout.decode()[-2000:]
        assert result["passed"] and result["errors"] == 0 and result["requests"] > 20
        for instance in result["instances"].values():
            assert (
                instance["idle_after"] and instance["free_or_cached_pages_after"] == instance["total_pages"]
            )
        assert len(result["samples"]) >= 4
    finally:
        for s in (gw, prefill, decode):
            s.stop()
