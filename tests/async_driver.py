"""Driving an ``Engine`` through ``AsyncEngine`` in tests: a bounded run, and the page oracle."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from engine.async_engine import AsyncEngine
from engine.engine import Engine


def all_pages_back(engine: Engine) -> bool:
    """Every page is free or held by the prefix cache alone (the allocator's own counts)."""
    return engine.allocator.num_free + engine.prefix_cache.num_cached_pages == engine.allocator.num_total


async def run(engine: Engine, body: Callable[[AsyncEngine], Awaitable[Any]], timeout_s: float = 60) -> Any:
    """Start an ``AsyncEngine`` on ``engine``, await ``body(driver)`` (at most ``timeout_s``), stop it."""
    driver = AsyncEngine(engine)
    driver.start()
    try:
        return await asyncio.wait_for(body(driver), timeout=timeout_s)
    finally:
        await driver.stop()
