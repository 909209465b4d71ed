"""The adapter pool's bookkeeping: single flight, LRU unloads, busy adapters stay.

The engine side here is two recording coroutines (the real engine is exercised in
test_gateway.py); this file checks the logic that decides when they are called.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lorabay.serve.metrics import GatewayMetrics
from lorabay.serve.pool import AdapterPool


class RecordingEngine:
    def __init__(self, load_seconds: float = 0.0, fail: set[str] | None = None):
        self.loaded: list[str] = []
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.load_seconds = load_seconds
        self.fail = fail or set()

    async def load(self, name: str, path: Path) -> None:
        self.loads.append(name)
        await asyncio.sleep(self.load_seconds)
        if name in self.fail:
            raise RuntimeError(f"cannot load {name}")
        assert name not in self.loaded, "loaded twice without an unload"
        self.loaded.append(name)

    async def unload(self, name: str) -> None:
        self.unloads.append(name)
        self.loaded.remove(name)


def make_pool(engine: RecordingEngine, max_loaded: int) -> AdapterPool:
    return AdapterPool(max_loaded, engine.load, engine.unload, GatewayMetrics())


async def use(pool: AdapterPool, key: str, prepared: list[str] | None = None, hold: float = 0.0):
    async def prepare() -> Path:
        if prepared is not None:
            prepared.append(key)
        await asyncio.sleep(0.01)
        return Path("/adapters") / key

    entry = await pool.acquire(key, f"engine-{key}", (key, "1"), prepare)
    await asyncio.sleep(hold)
    pool.release(entry)
    return entry


def test_twenty_concurrent_first_requests_prepare_and_load_once():
    async def main():
        engine = RecordingEngine(load_seconds=0.05)
        pool = make_pool(engine, max_loaded=4)
        prepared: list[str] = []
        await asyncio.gather(*(use(pool, "a", prepared) for _ in range(20)))
        return engine, prepared, pool

    engine, prepared, pool = asyncio.run(main())
    assert prepared == ["a"]
    assert engine.loads == ["engine-a"]
    assert pool.loaded == ["engine-a"]
    hits = pool.metrics.cache_hits.labels("a", "1")._value.get()
    assert hits == 0  # all 20 arrived before it was loaded: they waited on the one load


def test_least_recently_used_is_unloaded_past_the_cap():
    async def main():
        engine = RecordingEngine()
        pool = make_pool(engine, max_loaded=2)
        await use(pool, "a")
        await use(pool, "b")
        await use(pool, "a")  # a is now more recent than b
        await use(pool, "c")
        await pool.drain()
        return engine, pool

    engine, pool = asyncio.run(main())
    assert engine.unloads == ["engine-b"]
    assert pool.loaded == ["engine-a", "engine-c"]
    assert engine.loaded == ["engine-a", "engine-c"]


def test_a_busy_adapter_is_not_unloaded_until_released():
    async def main():
        engine = RecordingEngine()
        pool = make_pool(engine, max_loaded=1)
        busy = asyncio.create_task(use(pool, "a", hold=0.2))
        await asyncio.sleep(0.05)
        await use(pool, "b")  # over the cap while a is busy: b (idle) goes, a stays
        await pool.drain()
        during = list(engine.loaded)
        await busy
        await use(pool, "c")
        await pool.drain()
        return engine, during

    engine, during = asyncio.run(main())
    assert during == ["engine-a"]
    assert "engine-a" in engine.unloads
    assert engine.loaded == ["engine-c"]


def test_a_failed_load_fails_its_waiters_and_is_retried_later():
    async def main():
        engine = RecordingEngine(load_seconds=0.02, fail={"engine-bad"})
        pool = make_pool(engine, max_loaded=4)
        results = await asyncio.gather(
            *(use(pool, "bad") for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, RuntimeError) for r in results)
        assert engine.loads == ["engine-bad"]  # one attempt for the five
        await use(pool, "good")
        with pytest.raises(RuntimeError):
            await use(pool, "bad")
        return engine, pool

    engine, pool = asyncio.run(main())
    assert engine.loads == ["engine-bad", "engine-good", "engine-bad"]
    assert pool.loaded == ["engine-good"]


def test_a_cancelled_first_request_does_not_cancel_the_load():
    async def main():
        engine = RecordingEngine(load_seconds=0.1)
        pool = make_pool(engine, max_loaded=4)
        first = asyncio.create_task(use(pool, "a"))
        await asyncio.sleep(0.02)
        second = asyncio.create_task(use(pool, "a"))
        await asyncio.sleep(0.02)
        first.cancel()
        await second
        return engine

    engine = asyncio.run(main())
    assert engine.loads == ["engine-a"]
    assert engine.loaded == ["engine-a"]


def test_reset_forgets_everything_and_reloads_on_demand():
    async def main():
        engine = RecordingEngine()
        pool = make_pool(engine, max_loaded=4)
        await use(pool, "a")
        pool.reset()
        engine.loaded.clear()  # a restarted engine knows nothing
        await use(pool, "a")
        return engine, pool

    engine, pool = asyncio.run(main())
    assert engine.loads == ["engine-a", "engine-a"]
    assert pool.loaded == ["engine-a"]


def test_a_load_that_ends_after_an_engine_restart_is_not_recorded_and_is_done_again():
    engine = RecordingEngine()
    generation = [1]

    async def load_across_a_restart(name: str, path: Path) -> None:
        await engine.load(name, path)
        if generation[0] == 1:  # engine 1 died as it loaded; engine 2 knows nothing
            generation[0] = 2
            engine.loaded.clear()

    async def main():
        pool = AdapterPool(
            4, load_across_a_restart, engine.unload, GatewayMetrics(), lambda: generation[0]
        )
        await use(pool, "a")
        return pool

    pool = asyncio.run(main())
    assert engine.loads == ["engine-a", "engine-a"]  # into engine 1, then again into engine 2
    assert pool.loaded == engine.loaded == ["engine-a"]
