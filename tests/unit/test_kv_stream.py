"""Layer-by-layer KV hand-off (``engine.kv_stream``, ``AsyncEngine.generate(stream_kv=True)``).

Oracles: HF transformers' own K/V cache for the same prompt on the same weights (what each layer
must hold when it is handed out), the step's progress counter (a layer was handed out while later
layers were still being computed) and the allocator's counts (every page free or cached at the end).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import torch
from async_driver import all_pages_back, run
from transformers import AutoModelForCausalLM

from engine import SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from engine.kv_stream import LayerProgress, StepFailed

FIRST_ONLY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
PAGE = 16


@pytest.fixture(params=[False, True], ids=["sync", "overlap"])
def engine(request, deep_model):
    cfg = EngineConfig(
        model=str(deep_model), page_size=PAGE, max_num_batched_tokens=512, kv_cache_bytes=64 << 20,
        overlap=request.param,
    )  # fmt: skip
    engine = Engine(cfg)
    yield engine
    engine.close()


def test_each_layer_is_final_when_handed_out_while_later_layers_compute(engine, deep_model):
    prompt = [(7 * i) % 500 + 3 for i in range(1000)]  # two chunks: only the last one overlaps
    num_layers = engine.model_config.num_layers

    async def body(driver):
        stream = await driver.generate("r", prompt, FIRST_ONLY, stream_kv=True)
        lease = await asyncio.wait_for(stream.kv_lease, 30)
        pool, pages = engine.runner.kv_pool, torch.tensor(lease.pages)
        layers, launched = [], []
        for layer in range(num_layers):
            await lease.progress.wait(layer)
            launched.append(lease.progress.num_done)  # layers computed when this one was handed out
            layers.append(pool.read_pages(layer, pages))  # [2, pages, page, kv_heads, head_dim]
        outputs = [out async for out in stream]
        await driver.call(lambda e: e.free_pages(lease.pages))
        return layers, launched, outputs

    layers, launched, outputs = asyncio.run(run(engine, body))
    assert outputs[-1].finished and outputs[-1].kv_pages is None  # the lease came early, not here
    assert len(layers[0][0]) == -(-len(prompt) // PAGE)
    assert min(launched) < num_layers, f"every layer was handed out after the step ({launched})"

    hf = AutoModelForCausalLM.from_pretrained(str(deep_model), torch_dtype=torch.float32)
    with torch.no_grad():
        cache = hf(torch.tensor([prompt]), use_cache=True).past_key_values
    for layer, kv in enumerate(layers):
        for i, want in enumerate((cache.layers[layer].keys, cache.layers[layer].values)):
            got = kv[i].flatten(0, 1)[: len(prompt)]  # [tokens, kv_heads, head_dim]
            torch.testing.assert_close(got, want[0].transpose(0, 1), rtol=1e-4, atol=1e-4)
    assert all_pages_back(engine)


def test_a_refused_or_abandoned_lease_goes_back(engine):
    async def body(driver):
        refused = await driver.generate("refused", list(range(3, 600)), FIRST_ONLY, stream_kv=True)
        refused.kv_lease.cancel()  # before the prompt's last step: the engine frees it on arrival
        assert [out async for out in refused][-1].finished
        left = await driver.generate("left", list(range(5, 700)), FIRST_ONLY, stream_kv=True)
        await asyncio.wait_for(left.kv_lease, 30)  # delivered, then the stream is left unread
        left.close()
        await driver.call(lambda e: e.free_pages(left.kv_lease.result().pages))  # the consumer's part
        for _ in range(500):
            if not engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        await driver.call(lambda e: None)

    asyncio.run(run(engine, body))
    assert all_pages_back(engine)


def test_a_failing_step_wakes_every_layer_waiter(engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected: layer 1's MLP failed")

    monkeypatch.setattr(engine.runner.model.model.layers[1].mlp, "forward", broken)

    async def body(driver):
        stream = await driver.generate("r", list(range(3, 100)), FIRST_ONLY, stream_kv=True)
        lease = await asyncio.wait_for(stream.kv_lease, 30)
        with pytest.raises(StepFailed, match="injected"):
            await asyncio.wait_for(lease.progress.wait(engine.model_config.num_layers - 1), 30)
        final = [out async for out in stream][-1]
        await driver.call(lambda e: e.free_pages(lease.pages))
        return final

    final = asyncio.run(run(engine, body))
    assert final.finished and final.finish_reason == "error"
    assert all_pages_back(engine)


def test_a_layer_event_follows_the_engines_device_not_the_threads(monkeypatch):
    """An engine on cuda:1 (``pdserve up --prefill-device cuda:1``) steps from a thread whose current
    device is cuda:0: an event recorded on that device's stream says nothing about the layer, and
    the layer would be sent before it is written. CUDA faked: ``Event.record()`` with no stream takes
    the current device's, as torch's does."""
    recorded = []

    def current_stream(device=None):
        return f"stream of {torch.device('cuda', 0) if device is None else torch.device(device)}"

    class Event:
        def record(self, stream=None):
            recorded.append(current_stream() if stream is None else stream)

        def synchronize(self):
            pass

    bound = []
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    progress = LayerProgress(2, torch.device("cuda", 1))
    progress.layer_done(0)
    progress.layer_done(1)
    assert recorded == ["stream of cuda:1"] * 2
    deadline = time.monotonic() + 10
    while not progress.is_ready(1) and time.monotonic() < deadline:  # its thread follows the events
        time.sleep(0.01)
    assert progress.is_ready(0) and progress.is_ready(1)
    assert bound == [torch.device("cuda", 1)]  # the thread following the events is on cuda:1 too


def test_a_forward_path_that_skips_the_layer_hook_fails_the_waiters_not_hangs(engine, monkeypatch):
    forward = engine.runner.forward
    monkeypatch.setattr(
        engine.runner, "forward", lambda fb: forward(dataclasses.replace(fb, on_layer_done=None))
    )

    async def body(driver):
        stream = await driver.generate("r", list(range(3, 100)), FIRST_ONLY, stream_kv=True)
        lease = await asyncio.wait_for(stream.kv_lease, 30)
        with pytest.raises(StepFailed, match="reported 0 of 8 layers"):
            await asyncio.wait_for(lease.progress.wait(0), 30)
        final = [out async for out in stream][-1]
        await driver.call(lambda e: e.free_pages(lease.pages))
        return final

    final = asyncio.run(run(engine, body))
    assert final.finished and final.finish_reason == "length"  # the step itself was fine
    assert all_pages_back(engine)
