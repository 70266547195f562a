"""Colocated serving — the non-disaggregated baseline: a gateway with decode instances only, each
running its requests' prompts itself (no prefill instance, no KV transfer).

Oracles: the single-process engine (``LLM``) for tokens and text; the instances' own load reports
for where requests went and that everything is freed; the gateway's /health and /metrics.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys

import httpx
import pytest
from services import REPO, Service, prefix_group_hits, start_all

from engine import LLM, SamplingParams
from gateway.client import AsyncClient

ENGINE = ("--page-size", "4", "--max-num-batched-tokens", "32", "--kv-cache-mib", "16")
MODEL = "tiny-qwen3"
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def colocated(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("colocated_logs")
    decodes = start_all([("decode", tiny_model, ENGINE)] * 2, logs)
    routes = [a for d in decodes for a in ("--decode", d.address)]
    gw = None
    try:
        gw = Service("gateway", tiny_model, "--served-model-name", MODEL, "--decode-policy", "round_robin",
                     *routes, log_dir=logs).wait_ready()  # fmt: skip
        yield {"gateway": gw, "decode": decodes}
    finally:
        for s in [gw, *decodes]:
            if s is not None:
                s.stop()


@pytest.fixture(scope="module")
def reference(tiny_model):
    return LLM(str(tiny_model), page_size=4, max_num_batched_tokens=32, kv_cache_bytes=16 << 20)


def test_health_says_colocated_and_ready(colocated):
    health = httpx.get(f"{colocated['gateway'].http_url}/health", timeout=TIMEOUT_S).json()
    assert health["ready"] and health["mode"] == "colocated" and health["prefill"] == {}
    assert all(health["decode"].values()) and len(health["decode"]) == 2


def test_completions_match_the_engine(colocated, reference):
    """Short prompts and one over several chunks (32-token budget), plain and streamed."""
    url = f"{colocated['gateway'].http_url}/v1/completions"
    prompts = ["The lighthouse keeper counted the ships", list(range(30, 130))]
    refs = reference.generate(prompts, SamplingParams(temperature=0, max_tokens=10, logprobs=1))
    for prompt, ref in zip(prompts, refs, strict=True):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 10, "temperature": 0, "logprobs": 1}
        out = httpx.post(url, json=body, timeout=TIMEOUT_S).json()
        assert out["choices"][0]["text"] == ref.text
        assert out["usage"]["completion_tokens"] == len(ref.token_ids)
        assert out["usage"]["prompt_tokens"] == len(ref.prompt_token_ids)
        assert out["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
            [lp.logprob for lp in ref.logprobs], abs=1e-4
        )
        with httpx.stream("POST", url, json=body | {"stream": True}, timeout=TIMEOUT_S) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
        assert text == ref.text


def test_concurrent_requests_spread_and_everything_is_freed(colocated, reference):
    """Eight concurrent gRPC requests over two decode instances (round robin): all exact; the
    repeated prompt hits the serving instance's own prefix cache; both instances idle after."""
    prompt = list(range(200, 260))
    ref = reference.generate([prompt], SamplingParams(temperature=0, max_tokens=6))[0]

    async def run():
        async with AsyncClient(colocated["gateway"].address, timeout_s=TIMEOUT_S) as client:
            return await asyncio.gather(
                *(client.generate(prompt, max_tokens=6, temperature=0) for _ in range(8))
            )

    outs = asyncio.run(run())
    assert all(o.token_ids == ref.token_ids for o in outs)
    again = asyncio.run(run())
    assert all(o.token_ids == ref.token_ids for o in again)
    assert any(o.cached_tokens > 0 for o in again), "a repeated prompt reuses the instance's prefix cache"
    loads = [d.wait_idle() for d in colocated["decode"]]
    assert all(load.num_running == 0 and load.num_waiting == 0 for load in loads)
    metrics = httpx.get(f"{colocated['gateway'].http_url}/metrics", timeout=TIMEOUT_S).text
    for d in colocated["decode"]:
        assert f'pdserve_instance_healthy{{address="{d.address}",role="decode"}} 1.0' in metrics
    assert "pdserve_time_to_first_token_seconds_count" in metrics


@pytest.mark.parametrize("policy", ["prefix_aware", "round_robin"])
def test_prefix_aware_routing_sends_follow_ups_to_the_instance_that_cached_them(
    colocated, tiny_model, policy
):
    """Colocated decode instances hold a prompt cache, so prefix-aware routing applies to them."""
    routes = [a for d in colocated["decode"] for a in ("--decode", d.address)]
    gw = Service("gateway", tiny_model, "--served-model-name", MODEL, "--decode-policy", policy, *routes,
                 log_dir=colocated["gateway"].log_path.parent).wait_ready()  # fmt: skip
    try:
        hits = prefix_group_hits(gw.http_url, MODEL, policy)
    finally:
        gw.stop()
    if policy == "prefix_aware":
        assert all(hits[3:]), hits
    else:
        assert not all(hits[3:]), "round robin splits some groups across the two instances"


def test_prefix_aware_decode_needs_colocated():
    from gateway.config import GatewayConfig

    with pytest.raises(ValueError, match="prefix_aware needs colocated decode"):
        GatewayConfig(
            model="m", prefill=("127.0.0.1:1",), decode=("127.0.0.1:2",), decode_policy="prefix_aware"
        )
    assert GatewayConfig(model="m", prefill=(), decode=("127.0.0.1:2",), decode_policy="prefix_aware")


def test_up_with_no_prefill_instances_is_colocated(tmp_path):
    """``pdserve up --num-prefill 0``: the README's one command, colocated."""
    from test_up import children_of, start_up, wait_gone

    proc, info = start_up(tmp_path, "--num-prefill", "0", "--num-decode", "1")
    try:
        kids = children_of(proc.pid)
        assert len(kids) == 2  # 1 decode, 1 gateway
        base = info["openai_base_url"]
        body = {
            "model": "tiny-qwen3",
            "prompt": "Hello",
            "max_tokens": 4,
            "temperature": 0,
            "ignore_eos": True,
        }
        r = httpx.post(f"{base}/completions", json=body, timeout=TIMEOUT_S)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert (
            httpx.get(base.removesuffix("/v1") + "/health", timeout=TIMEOUT_S).json()["mode"] == "colocated"
        )
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert wait_gone(kids, 10) == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_gateway_needs_a_decode_instance(tiny_model):
    r = subprocess.run(
        [sys.executable, "-m", "pdserve", "gateway", "--model", str(tiny_model), "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode != 0 and "--decode" in r.stderr


def test_goodput_sweep_over_a_running_system(colocated, tmp_path):
    """``pdserve goodput`` end to end: two rates against the colocated gateway (named twice, as
    two targets would be), a report with a point per (target, rate) and the plot."""
    url = colocated["gateway"].http_url
    cmd = [sys.executable, "-m", "pdserve", "goodput", "--target", f"a={url}", "--target", f"b={url}",
           "--rates", "4,40", "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--num-requests", "6",
           "--warmup-requests", "1", "--input-len-min", "8", "--input-len-max", "24", "--output-len-min", "2",
           "--output-len-max", "6", "--max-duration-s", "30", "--out-dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "goodput_sweep.json").read_text())
    for name in ("a", "b"):
        points = report["results"][name]
        assert [p["rate"] for p in points] == [4.0, 40.0]
        assert all(p["completed"] == 6 and p["failed"] == 0 and p["goodput"] > 0 for p in points)
    assert set(report["ratio_at_knee"]) == {"a/b", "b/a"}
    assert (tmp_path / "goodput_sweep.png").stat().st_size > 0
