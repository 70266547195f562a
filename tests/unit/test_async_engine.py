"""AsyncEngine: the services' driver of an engine. Oracles: the offline LLM's outputs, and the page
allocator's own counts (every page free or cached once requests end)."""

from __future__ import annotations

import asyncio
import time

import pytest
from async_driver import all_pages_back, run

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import AlreadyRunning

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(params=[False, True], ids=["sync", "overlap"])
def overlap(request) -> bool:
    """Every test runs with and without overlap scheduling (outputs one step later)."""
    return request.param


def make_engine(model, overlap: bool) -> Engine:
    return Engine(
        EngineConfig(
            model=str(model), page_size=4, max_num_batched_tokens=16, kv_cache_bytes=4 << 20, overlap=overlap
        )
    )


def test_concurrent_streams_equal_offline_generate(tiny_model, overlap):
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 40, 9)]
    expected = LLM(str(tiny_model), page_size=4, max_num_batched_tokens=16).generate(prompts, GREEDY)
    engine = make_engine(tiny_model, overlap)

    async def body(driver):
        async def one(i, prompt):
            stream = await driver.generate(f"r{i}", prompt, GREEDY)
            return [t async for out in stream for t in out.new_token_ids]

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    got = asyncio.run(run(engine, body))
    assert got == [o.token_ids for o in expected]
    assert all_pages_back(engine)


def test_deadline_finishes_the_request_and_frees_its_pages(tiny_model, overlap):
    engine = make_engine(tiny_model, overlap)
    long = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)  # seconds of decoding

    async def body(driver):
        stream = await driver.generate(
            "slow", list(range(30)), long, deadline_ns=time.time_ns() + 200_000_000
        )
        return [out async for out in stream]

    start = time.monotonic()
    outs = asyncio.run(run(engine, body))
    assert outs[-1].finished and outs[-1].finish_reason == "deadline"
    assert time.monotonic() - start < 5
    assert all_pages_back(engine)


def test_leaving_a_stream_early_aborts_and_frees(tiny_model, overlap):
    engine = make_engine(tiny_model, overlap)
    long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)

    async def body(driver):
        stream = await driver.generate("r", list(range(20)), long)
        async for out in stream:
            if out.num_output_tokens >= 3:
                break
        stream.close()
        await driver.call(lambda e: None)  # the abort command has run once this returns
        return driver.num_requests, engine.has_unfinished()

    assert asyncio.run(run(engine, body)) == (0, False)
    assert all_pages_back(engine)


def test_held_kv_is_leased_until_freed_even_when_nobody_reads_it(tiny_model, overlap):
    engine = make_engine(tiny_model, overlap)
    one = SamplingParams(temperature=0, max_tokens=1)

    async def body(driver):
        read = await driver.generate("read", list(range(10)), one, hold_kv=True)
        final = [out async for out in read][-1]
        leased = list(final.kv_pages)
        held = [engine.allocator.refcount(p) for p in leased]
        await driver.call(lambda e: e.free_pages(leased))
        ignored = await driver.generate("ignored", list(range(50, 60)), one, hold_kv=True)
        for _ in range(200):  # let it finish without reading the stream
            if not engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        ignored.close()
        await driver.call(lambda e: None)
        return leased, held

    leased, held = asyncio.run(run(engine, body))
    assert len(leased) == 3 and all(c >= 1 for c in held)  # ceil(10 / 4) pages, each still owned
    assert all_pages_back(engine)


def test_validation_errors_reach_the_caller_and_nothing_is_left_behind(tiny_model, overlap):
    engine = make_engine(tiny_model, overlap)

    async def body(driver):
        with pytest.raises(ValueError, match="prompt"):
            await driver.generate("bad", [], GREEDY)
        stream = await driver.generate("ok", [1, 2, 3], GREEDY)
        with pytest.raises(AlreadyRunning):
            await driver.generate("ok", [1, 2, 3], GREEDY)
        return [out async for out in stream][-1].finish_reason

    assert asyncio.run(run(engine, body)) == "length"
    assert all_pages_back(engine)


@pytest.mark.parametrize("yields_before_cancel", [0, 1, 2, 3, 5])
def test_cancelling_adopt_at_any_point_frees_the_pages_once(tiny_model, overlap, yields_before_cancel):
    """The hand-over of reserved pages to the engine must survive the caller being cancelled
    before, during or after the engine adopted them (no leak, no double free)."""
    engine = make_engine(tiny_model, overlap)

    async def body(driver):
        pages = await driver.call(lambda e: e.reserve_pages(3))
        task = asyncio.ensure_future(
            driver.adopt("r", list(range(10)), GREEDY, 1, pages, first_token=5, first_logprob=None)
        )
        for _ in range(yields_before_cancel):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for _ in range(100):  # the engine finishes or aborts the adopted request
            await driver.call(lambda e: None)
            if not engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        return engine.has_unfinished()

    assert asyncio.run(run(engine, body)) is False
    assert all_pages_back(engine)


@pytest.mark.parametrize("yields_before_cancel", [0, 1, 2, 3])
def test_a_cancelled_call_is_skipped_or_undone(tiny_model, overlap, yields_before_cancel):
    engine = make_engine(tiny_model, overlap)

    async def body(driver):
        task = asyncio.ensure_future(
            driver.call(lambda e: e.reserve_pages(4), undo=lambda e, pages: e.free_pages(pages))
        )
        for _ in range(yields_before_cancel):
            await asyncio.sleep(0)
        task.cancel()
        result = (await asyncio.gather(task, return_exceptions=True))[0]
        await driver.call(lambda e: None)
        return result

    result = asyncio.run(run(engine, body))
    if isinstance(result, list):  # the call completed before the cancel: the caller owns the pages
        engine.free_pages(result)
    assert all_pages_back(engine)


def test_a_failing_step_with_a_failing_abort_still_ends_every_stream(tiny_model, overlap, monkeypatch):
    engine = make_engine(tiny_model, overlap)

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    async def body(driver):
        stream = await driver.generate("r", [1, 2, 3], GREEDY)
        monkeypatch.setattr(engine, "step", broken)
        monkeypatch.setattr(engine, "abort", broken)
        return [out async for out in stream][-1].finish_reason

    assert asyncio.run(run(engine, body)) == "error"


def test_the_step_thread_binds_itself_before_any_step(tiny_model, monkeypatch):
    """What a runner keeps per thread (its current CUDA device, cuDNN's plans) is built on the
    thread that steps it: AsyncEngine's step thread runs ``ModelRunner.bind_thread`` as it starts,
    before the first request arrives."""
    import threading

    from engine.model_runner import ModelRunner

    bound: list[str] = []
    monkeypatch.setattr(
        ModelRunner, "bind_thread", lambda self: bound.append(threading.current_thread().name)
    )
    engine = make_engine(tiny_model, overlap=False)
    assert bound == [threading.current_thread().name]  # the constructing thread is bound

    async def body(driver) -> None:
        deadline = time.monotonic() + 10
        while len(bound) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    asyncio.run(run(engine, body))
    engine.close()
    assert len(bound) == 2 and bound[1].startswith("engine-step")
