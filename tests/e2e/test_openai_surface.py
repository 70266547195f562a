"""The OpenAI surface beyond plain generation, through real gateways on loopback: sampling controls
(penalties, logit_bias, min_p, min_tokens) disaggregated (prefill samples the first token, decode
the rest) and colocated, honest errors for what is not implemented, /v1/models/{id}, /tokenize,
/detokenize, /version and chat_template_kwargs.

Oracles: the single-process engine (``LLM``) and HF transformers ``generate`` on the same weights
for tokens; the model's own ``tokenizers`` file for token ids; the official ``openai`` SDK's
exception types for errors.
"""

from __future__ import annotations

import json
import shutil

import grpc
import httpx
import pytest
import torch
from services import Service, start_all

from engine import LLM, SamplingParams
from gateway.client import Client

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ENGINE = ("--page-size", "4", "--max-num-batched-tokens", "32", "--kv-cache-mib", "16")
MODEL = "tiny-qwen3"
TIMEOUT_S = 60
# A template that reads a variable only chat_template_kwargs can set (like Qwen3's enable_thinking).
THINKING_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    """The tiny model with a chat template that has a thinking switch."""
    path = tmp_path_factory.mktemp("surface") / "model"
    shutil.copytree(tiny_model, path)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = THINKING_TEMPLATE
    config_path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def gateways(model_dir, tmp_path_factory):
    """One prefill and one decode; a gateway routes P→D, another sends everything to the decode
    instance, which then runs the prompts itself (colocated)."""
    logs = tmp_path_factory.mktemp("surface_logs")
    prefill, decode = start_all([("prefill", model_dir, ENGINE), ("decode", model_dir, ENGINE)], logs)
    started = [prefill, decode]
    try:
        for routes in (
            ("--prefill", prefill.address, "--decode", decode.address),
            ("--decode", decode.address),
        ):
            started.append(Service("gateway", model_dir, "--served-model-name", MODEL, *routes, log_dir=logs))
        for gw in started[2:]:
            gw.wait_ready()
        yield {"disaggregated": started[2], "colocated": started[3]}
    finally:
        for s in started:
            s.stop()


@pytest.fixture(scope="module")
def reference(model_dir):
    return LLM(str(model_dir), page_size=4, max_num_batched_tokens=32, kv_cache_bytes=16 << 20)


def sdk(gw: Service):
    return openai.OpenAI(base_url=f"{gw.http_url}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)


# Each changes the tiny model's output for the prompt below (a dropped control would show).
CONTROLS = [
    {"temperature": 0, "repetition_penalty": 1.6},
    {"temperature": 0, "presence_penalty": 1.5, "frequency_penalty": 1.0},
    {"temperature": 0, "logit_bias": {"17": 8.0, "30": -100.0}},
    {"temperature": 0.9, "seed": 7, "min_p": 0.2, "frequency_penalty": -0.5},
    {"temperature": 1.0, "seed": 3, "top_k": 20, "repetition_penalty": 0.5, "min_tokens": 12},
]


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
@pytest.mark.parametrize(
    "controls", CONTROLS, ids=lambda c: "+".join(k for k in c if k not in ("temperature", "seed"))
)
def test_sampling_controls_match_the_engine(gateways, reference, mode, controls):
    prompt = "The lighthouse keeper counted the ships"
    bias = {int(t): b for t, b in controls.get("logit_bias", {}).items()}
    params = SamplingParams(max_tokens=12, **(controls | {"logit_bias": bias}))
    ref = reference.generate([prompt], params)[0]
    r = httpx.post(f"{gateways[mode].http_url}/v1/completions", timeout=TIMEOUT_S,
                   json={"model": MODEL, "prompt": prompt, "max_tokens": 12, **controls})  # fmt: skip
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (ref.text, ref.finish_reason)
    with Client(gateways[mode].address, timeout_s=TIMEOUT_S) as client:  # the public gRPC API
        assert (
            client.generate(prompt, max_tokens=12, **(controls | {"logit_bias": bias})).token_ids
            == ref.token_ids
        )


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_repetition_penalty_greedy_equals_hf_generate(gateways, model_dir, mode):
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # ignore_eos
    prompt = torch.randint(0, hf.config.vocab_size, (9,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 9, dtype=torch.long), do_sample=False,
                          max_new_tokens=20, repetition_penalty=1.7, pad_token_id=0)  # fmt: skip
    with Client(gateways[mode].address, timeout_s=TIMEOUT_S) as client:
        got = client.generate(prompt, temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=1.7)
    assert got.token_ids == out[0, 9:].tolist()


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_min_tokens_holds_back_a_stop_token_from_the_first_token_on(gateways, reference, mode):
    prompt = "user: What is the capital of France?"
    first = reference.generate([prompt], SamplingParams(temperature=0, max_tokens=1))[0].token_ids[0]
    body = {"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": 6, "stop_token_ids": [first]}
    url = f"{gateways[mode].http_url}/v1/completions"
    stopped = httpx.post(url, json=body, timeout=TIMEOUT_S).json()
    assert stopped["usage"]["completion_tokens"] == 1 and stopped["choices"][0]["finish_reason"] == "stop"
    held = httpx.post(url, json=body | {"min_tokens": 4}, timeout=TIMEOUT_S).json()
    assert held["usage"]["completion_tokens"] >= 4


UNSUPPORTED = [
    ("completions", {"echo": True}, "echo"),
    ("completions", {"best_of": 2}, "best_of"),
    ("completions", {"n": 2}, "n"),
    ("completions", {"suffix": "end"}, "suffix"),
    ("completions", {"prompt_logprobs": 1}, "prompt_logprobs"),
    ("completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("completions", {"guided_json": {}}, "guided_json"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat", {"tool_choice": "auto"}, "tool_choice"),
    ("chat", {"functions": [{"name": "f"}]}, "functions"),
    ("chat", {"function_call": "auto"}, "function_call"),
    ("chat", {"modalities": ["text", "audio"]}, "modalities"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ("chat", {"reasoning_effort": "high"}, "reasoning_effort"),
    ("chat", {"store": True}, "store"),
    ("chat", {"n": 3}, "n"),
    ("chat", {"frobnicate": 1}, "frobnicate"),
]


@pytest.mark.parametrize(("api", "extra", "param"), UNSUPPORTED, ids=[f"{a}-{p}" for a, _, p in UNSUPPORTED])
def test_unimplemented_fields_are_400_naming_them(gateways, api, extra, param):
    gw = gateways["disaggregated"]
    if api == "chat":
        url, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}
    else:
        url, body = "/v1/completions", {"prompt": "hi"}
    r = httpx.post(
        gw.http_url + url, json={"model": MODEL, "max_tokens": 2, **body, **extra}, timeout=TIMEOUT_S
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and "not supported" in error["message"] and param in error["message"]
    assert error["code"] in ("unsupported_parameter", "unsupported_value")


def test_no_op_values_of_unimplemented_fields_are_accepted(gateways):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 1,
            "tools": [], "tool_choice": "none", "modalities": ["text"], "response_format": {"type": "text"},
            "store": False, "parallel_tool_calls": False, "service_tier": "auto"}  # fmt: skip
    r = httpx.post(f"{gateways['disaggregated'].http_url}/v1/chat/completions", json=body, timeout=TIMEOUT_S)
    assert r.status_code == 200, r.text


def test_the_sdk_gets_typed_errors_and_can_retrieve_the_model(gateways):
    client = sdk(gateways["disaggregated"])
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-9")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-9", prompt="x", max_tokens=2)
    assert e.value.code == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, echo=True)
    assert "echo" in e.value.message and "not supported" in e.value.message
    got = client.completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=0,
                                    presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"5": 2.0})  # fmt: skip
    assert got.usage.completion_tokens >= 1


def test_grpc_unknown_model_is_not_found(gateways):
    client = Client(gateways["disaggregated"].address, timeout_s=TIMEOUT_S)
    with client, pytest.raises(grpc.RpcError) as e:
        client.generate("x", model="gpt-9", max_tokens=2)
    assert e.value.code() is grpc.StatusCode.NOT_FOUND


def test_every_error_is_the_openai_envelope_with_a_string_or_null_code(gateways):
    url = gateways["disaggregated"].http_url
    for r in (httpx.get(f"{url}/nowhere"), httpx.delete(f"{url}/v1/models"),
              httpx.post(f"{url}/v1/completions", json={"model": "gpt-9", "prompt": "x"}),
              httpx.post(f"{url}/tokenize", json={"prompt": "x", "extra": 1})):  # fmt: skip
        assert r.status_code in (400, 404, 405), r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] is None or isinstance(error["code"], str)


def test_tokenize_detokenize_and_version(gateways, model_dir):
    url = gateways["colocated"].http_url
    oracle = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = "The harbor filled with the smell of salt"
    r = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": text, "return_token_strs": True})
    body = r.json()
    assert r.status_code == 200 and body["tokens"] == oracle.encode(text, add_special_tokens=True).ids
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] > 0
    assert "".join(body["token_strs"]) == oracle.decode(body["tokens"], skip_special_tokens=False)
    back = httpx.post(f"{url}/detokenize", json={"model": MODEL, "tokens": body["tokens"]}).json()
    assert back == {"prompt": oracle.decode(body["tokens"], skip_special_tokens=False)}
    assert httpx.post(f"{url}/detokenize", json={"tokens": [10**6]}).status_code == 400
    assert httpx.post(f"{url}/tokenize", json={"model": "gpt-9", "prompt": "x"}).status_code == 404
    version = httpx.get(f"{url}/version").json()["version"]
    assert isinstance(version, str) and version


def test_chat_template_kwargs_reach_the_template(gateways):
    url = gateways["disaggregated"].http_url
    messages = [{"role": "user", "content": "Can you write a haiku about autumn?"}]

    def counts(kwargs):
        extra = {} if kwargs is None else {"chat_template_kwargs": kwargs}
        tok = httpx.post(f"{url}/tokenize", json={"model": MODEL, "messages": messages, **extra}).json()
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=TIMEOUT_S,
                          json={"model": MODEL, "messages": messages, "max_tokens": 1, **extra}).json()  # fmt: skip
        return tok["count"], chat["usage"]["prompt_tokens"]

    plain, thinking_off = counts(None), counts({"enable_thinking": False})
    assert plain[0] == plain[1] and thinking_off[0] == thinking_off[1]  # /tokenize counts what chat sends
    assert thinking_off[0] > plain[0]  # the template's switch took effect
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": messages,
                                                        "chat_template_kwargs": {"tools": []}})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"
