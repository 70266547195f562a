"""Layer-by-layer KV hand-off on CUDA (GPU box only): each layer read on a side stream as soon as
its event says so equals the pool after the step, through piecewise graphs (a last chunk within
the piecewise limit) and the eager forward (above it); and when layer 0 is handed out of a long
step, the last layer is not done yet on the device. Oracle: the pool's own content once the
request finished, and the device's own events."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from engine import SamplingParams  # noqa: E402
from engine.async_engine import AsyncEngine  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.make_model import make_model  # noqa: E402

# ~1B parameters (dummy weights, nothing written): the eager step below takes milliseconds.
SHAPE = dict(arch="qwen3", num_layers=16, hidden_size=2048, intermediate_size=8192, num_heads=16, num_kv_heads=4,
             head_dim=128, max_position_embeddings=8192, weights=False)  # fmt: skip
FIRST_ONLY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
# The last GPU: with two or more, not the current device of the engine's threads (events must follow
# the engine's device).
DEVICE = f"cuda:{torch.cuda.device_count() - 1}" if torch.cuda.is_available() else "cuda"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("kvstream") / "qwen3", seed=5, **SHAPE)


@pytest.fixture
def engine(model_dir):
    """One engine per test: the test's ``AsyncEngine.stop`` closes it (and frees its memory)."""
    cfg = EngineConfig(
        model=str(model_dir), device=DEVICE, dtype="bfloat16", attention_backend="triton", load_format="dummy",
        kv_cache_bytes=1 << 30, max_num_batched_tokens=2048, max_piecewise_tokens=512,
    )  # fmt: skip
    previous = torch.cuda.current_device()
    engine = Engine(cfg)  # makes DEVICE this thread's current device (``use_device``)
    yield engine
    engine.close()  # idempotent; frees its GPU memory: later tests size their KV pools from what is free
    torch.cuda.empty_cache()
    torch.cuda.set_device(previous)  # the tests after this one expect the default


@pytest.mark.parametrize("prompt_len", [300, 2048 + 1500], ids=["piecewise", "eager"])
def test_each_layer_read_when_ready_equals_the_final_pool(engine, prompt_len):
    prompt = [(13 * i) % 1000 + 7 for i in range(prompt_len)]
    layers_n = engine.model_config.num_layers
    side = torch.cuda.Stream(DEVICE)

    async def body():
        driver = AsyncEngine(engine)
        driver.start()
        try:
            stream = await driver.generate(f"r{prompt_len}", prompt, FIRST_ONLY, stream_kv=True)
            lease = await asyncio.wait_for(stream.kv_lease, 60)
            pages = torch.tensor(lease.pages, device=DEVICE)
            early, ready_s = [], []
            last_ready_with_first = None
            for layer in range(layers_n):
                await asyncio.wait_for(lease.progress.wait(layer), 60)
                ready_s.append(time.perf_counter())
                if layer == 0:
                    last_ready_with_first = lease.progress.is_ready(layers_n - 1)
                with torch.cuda.stream(side):  # not the engine's stream: no implicit ordering
                    early.append(engine.runner.kv_pool.read_pages(layer, pages).clone())
            side.synchronize()
            outputs = [out async for out in stream]
            late = [engine.runner.kv_pool.read_pages(layer, pages) for layer in range(layers_n)]
            await driver.call(lambda e: e.free_pages(lease.pages))
            return early, late, ready_s, outputs, last_ready_with_first
        finally:
            await driver.stop()

    early, late, ready_s, outputs, last_ready_with_first = asyncio.run(body())
    assert outputs[-1].finished and outputs[-1].finish_reason == "length"
    for layer, (a, b) in enumerate(zip(early, late, strict=True)):
        assert torch.equal(a, b), f"layer {layer} changed after it was handed out"
    spread_ms = (ready_s[-1] - ready_s[0]) * 1e3
    print(f"prompt {prompt_len}: layers ready over {spread_ms:.2f} ms")
    if prompt_len > 2048:  # a 1500-token chunk through ~1B parameters: milliseconds of device time
        assert not last_ready_with_first, "layer 0 was handed out only once the whole step was done"
