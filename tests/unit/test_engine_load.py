"""The engine's load snapshot (``AsyncEngine.load``), what load reports are made of. Oracles: the
pages a request's tokens need (ceil(tokens / page_size)), the requests a test has queued, and the
engine's own page counts once everything ended."""

from __future__ import annotations

import asyncio
import threading

from async_driver import all_pages_back, run

from engine import SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from protos.convert import is_idle, load_report

PAGE = 4
LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)


def make_engine(model, max_num_seqs: int = 256) -> Engine:
    return Engine(
        EngineConfig(
            model=str(model), page_size=PAGE, max_num_batched_tokens=64, kv_cache_bytes=4 << 20,
            max_num_seqs=max_num_seqs, overlap=False,
        )
    )  # fmt: skip


def test_free_pages_drop_while_a_request_runs_and_come_back_after(tiny_model):
    engine = make_engine(tiny_model)
    prompt = list(range(5, 35))

    async def body(driver):
        at_start = driver.load
        stream = await driver.generate("r", prompt, LONG)
        num_tokens = len(prompt)
        async for out in stream:
            num_tokens += len(out.new_token_ids)
            if out.num_output_tokens >= 5:
                break
        await driver.call(lambda e: None)  # a loop turn: the snapshot is at least this recent
        running = driver.load
        stream.close()
        await driver.call(lambda e: None)  # the abort has run
        return at_start, running, num_tokens, driver.load

    at_start, running, num_tokens, after = asyncio.run(run(engine, body))
    assert at_start.num_free_pages == at_start.num_total_pages and at_start.num_running == 0
    assert running.num_running == 1 and running.num_waiting == 0
    assert running.num_total_pages - running.num_free_pages >= -(-num_tokens // PAGE)
    assert after.num_running == 0 and after.num_waiting == 0
    assert after.num_free_pages + after.num_cached_pages == after.num_total_pages
    assert is_idle(load_report(after, "decode", 0, 0, 0))
    assert all_pages_back(engine)


def test_requests_past_max_num_seqs_show_as_waiting(tiny_model):
    engine = make_engine(tiny_model, max_num_seqs=1)

    async def body(driver):
        streams = [await driver.generate(f"r{i}", list(range(10 + i, 30 + i)), LONG) for i in range(3)]
        await anext(aiter(streams[0]))  # the first runs
        await driver.call(lambda e: None)
        load = driver.load
        for stream in streams:
            stream.close()
        await driver.call(lambda e: None)
        return load, driver.load

    busy, after = asyncio.run(run(engine, body))
    assert (busy.num_running, busy.num_waiting, busy.num_unfinished) == (1, 2, 3)
    assert busy.max_num_seqs == 1 and busy.page_size == PAGE
    assert (after.num_running, after.num_waiting) == (0, 0)


def test_the_snapshot_is_never_taken_while_a_step_runs(tiny_model, monkeypatch):
    """Read while a step changes the scheduler and allocator, counts could be torn: every snapshot
    is taken between steps (on the step thread after one, or by the loop between them)."""
    engine = make_engine(tiny_model)
    stepping = threading.Event()
    overlaps: list[str] = []
    real_step, real_load = engine.step, engine.load

    def step():
        stepping.set()
        try:
            return real_step()
        finally:
            stepping.clear()

    def load():
        if stepping.is_set():
            overlaps.append(threading.current_thread().name)
        return real_load()

    monkeypatch.setattr(engine, "step", step)
    monkeypatch.setattr(engine, "load", load)

    async def body(driver):
        async def one(i):
            stream = await driver.generate(
                f"r{i}", list(range(3, 20 + i)), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
            )
            return [out async for out in stream][-1].finish_reason

        return await asyncio.gather(*(one(i) for i in range(4)))

    assert asyncio.run(run(engine, body)) == ["length"] * 4
    assert overlaps == []
