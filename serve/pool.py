"""Which adapters are loaded in the engine: load once, unload the least recently used.

Keyed by the engine name (``name@sha256:<digest>``), the one name the engine knows an
adapter by, so the pool and the engine always agree on what is loaded: references to
one name share one load, and a moved alias can never reach stale weights (new
content is a new key and a new engine name). Two names with the same content are
two engine adapters, counted as two. Concurrent first requests for one adapter wait on a single load
(single flight). An adapter is never unloaded while a request is using it: past
``max_loaded`` the pool unloads idle ones, least recently used first, and stays
over the cap only while every loaded adapter is busy.

The engine side is two coroutines, ``load(name, path)`` and ``unload(name)``, and the
engine's generation (which engine process is running: the supervisor's count of starts),
so this bookkeeping is tested without vLLM (tests/serve/test_pool.py).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("lorabay.serve")


@dataclass
class LoadedAdapter:
    key: str  # the engine name
    engine_name: str
    labels: tuple[str, str]  # (adapter name, version) for metrics
    users: int = 0
    folder: object = None  # what prepare gave; a hub CacheLease pins it in the pull cache


def release_folder(folder) -> None:
    """The engine no longer has the adapter: the pull cache may prune its folder again.
    (A load that failed drops its lease with the task: CacheLease closes on collection.)"""
    release = getattr(folder, "release", None)
    if release is not None:
        release()


class AdapterPool:
    def __init__(
        self,
        max_loaded: int,
        load: Callable[[str, Path], Awaitable[None]],
        unload: Callable[[str], Awaitable[None]],
        metrics=None,
        generation: Callable[[], int] = lambda: 0,
    ):
        self.max_loaded = max_loaded
        self._load = load
        self._unload = unload
        self.metrics = metrics
        self._loaded: collections.OrderedDict[str, LoadedAdapter] = collections.OrderedDict()
        self._loading: dict[str, asyncio.Task] = {}
        self._unloading: dict[str, asyncio.Future] = {}
        self._background: set[asyncio.Task] = set()
        # The engine process a load went to (EngineSupervisor.generation): a load that
        # finishes after a restart loaded into the dead engine and is not recorded.
        self._generation = generation

    @property
    def loaded(self) -> list[str]:
        """Engine names, least recently used first."""
        return [entry.engine_name for entry in self._loaded.values()]

    @property
    def owned(self) -> set[str]:
        """Engine names this pool loaded or is loading: every other adapter in the engine
        is a stranger."""
        return set(self.loaded) | set(self._loading)

    async def acquire(
        self,
        key: str,
        engine_name: str,
        labels: tuple[str, str],
        prepare: Callable[[], Awaitable[Path]],
    ) -> LoadedAdapter:
        """The loaded adapter for ``key``, loading it first if needed; call :meth:`release`.

        ``prepare`` returns the verified local folder (pull, verify, compatibility check);
        it runs once per load, however many requests wait for it.
        """
        entry = self._loaded.get(key)
        if entry is not None:
            if self.metrics:
                self.metrics.cache_hits.labels(*labels).inc()
        while entry is None:
            task = self._loading.get(key)
            if task is None:
                # The load runs as its own task: a waiter that goes away (client gone)
                # cancels only its wait, never the load the others wait for.
                task = asyncio.get_running_loop().create_task(
                    self._load_entry(key, engine_name, labels, prepare)
                )
                self._loading[key] = task
                task.add_done_callback(lambda t, key=key: self._load_done(key, t))
            await asyncio.shield(task)
            entry = self._loaded.get(key)  # None only if the engine restarted meanwhile
        self._loaded.move_to_end(key)
        entry.users += 1
        self._schedule_evict()
        return entry

    def _load_done(self, key: str, task: asyncio.Task) -> None:
        self._loading.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here: a load whose waiters all left must not warn

    async def _load_entry(self, key, engine_name, labels, prepare) -> None:
        generation = self._generation()
        started = time.perf_counter()
        path = await prepare()
        if key in self._unloading:  # the engine is still dropping an earlier copy
            await asyncio.shield(self._unloading[key])
        prepared = time.perf_counter()
        await self._load(engine_name, path)
        seconds = time.perf_counter() - started
        if generation != self._generation():
            return
        self._loaded[key] = LoadedAdapter(key, engine_name, labels, folder=path)
        if self.metrics:
            self.metrics.loads.labels(*labels).inc()
            self.metrics.load_seconds.labels(*labels).observe(seconds)
            self.metrics.loaded.set(len(self._loaded))
        log.info(
            "adapter loaded: %s in %.0f ms (pull, verify, check %.0f ms; engine %.0f ms)",
            engine_name,
            seconds * 1000,
            (prepared - started) * 1000,
            (started + seconds - prepared) * 1000,
        )

    def release(self, entry: LoadedAdapter) -> None:
        entry.users -= 1
        if entry.users == 0:
            self._schedule_evict()

    def _schedule_evict(self) -> None:
        # In the background: the request that pushed the pool over the cap does not wait.
        if len(self._loaded) > self.max_loaded:
            task = asyncio.get_running_loop().create_task(self._evict())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for background unloads (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def _evict(self) -> None:
        while len(self._loaded) > self.max_loaded:
            idle = next((e for e in self._loaded.values() if e.users == 0), None)
            if idle is None:
                return  # every loaded adapter is busy; the next release tries again
            del self._loaded[idle.key]
            done = asyncio.get_running_loop().create_future()
            self._unloading[idle.key] = done
            try:
                await self._unload(idle.engine_name)
                if self.metrics:
                    self.metrics.unloads.labels(*idle.labels).inc()
                log.info("adapter unloaded (least recently used): %s", idle.engine_name)
            except Exception as error:  # the engine forgot it already, or is restarting
                log.warning("unloading %s failed: %s", idle.engine_name, error)
            finally:
                release_folder(idle.folder)
                self._unloading.pop(idle.key, None)
                done.set_result(None)
                if self.metrics:
                    self.metrics.loaded.set(len(self._loaded))

    def forget(self, key: str) -> None:
        """The engine does not know this adapter any more (it answered 404): load it again."""
        release_folder(getattr(self._loaded.pop(key, None), "folder", None))

    def reset(self) -> None:
        """The engine went down or restarted: nothing is loaded. A load in flight went to
        the dead engine; one that ends after the restart (a new generation) is not
        recorded, one that ends before it is forgotten by the restart's reset."""
        for entry in self._loaded.values():
            release_folder(entry.folder)
        self._loaded.clear()
        if self.metrics:
            self.metrics.loaded.set(0)
