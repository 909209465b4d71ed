"""The pull cache: a byte budget, least recently used first, never a folder in use.

"In use" crosses processes: a folder held by one process (a pull, a gateway whose engine
has the adapter loaded) survives `lorabay hub cache prune` run from another shell, and
goes once it is released.
"""

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hubtools import WORKER, run_worker

from lorabay.cli.main import cli
from lorabay.hub import Registry


def cached(lorabay_home) -> set[str]:
    cache = lorabay_home / "cache"
    return {p.name for p in cache.iterdir() if len(p.name) == 64} if cache.is_dir() else set()


def prune_from_another_process(lorabay_home, *args) -> dict:
    """`lorabay hub cache prune ...` as a separate process, as from another shell."""
    done = subprocess.run(
        [sys.executable, "-m", "lorabay.cli.main", "hub", "cache", "prune", *args, "--json"],
        env={**os.environ, "LORABAY_HOME": str(lorabay_home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class Holder:
    """A separate process that pulls REF and holds the cached folder until released."""

    def __init__(self, url: str, ref: str, signals: Path):
        signals.mkdir(parents=True, exist_ok=True)
        self.signals = signals
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), "hold", url, ref, str(signals)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while not (signals / "held").exists():
            assert self.process.poll() is None, self.process.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the holder never held the folder"
            time.sleep(0.02)
        self.path = Path((signals / "held").read_text())

    def release(self) -> None:
        (self.signals / "release").touch()
        out, err = self.process.communicate(timeout=60)
        assert self.process.returncode == 0, err[-2000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def test_a_budget_keeps_the_most_recently_used(store_url, lora, lorabay_home, monkeypatch):
    reg = Registry.open(store_url)
    a, b, c = (reg.push(lora(seed=s), n).manifest for s, n in ((1, "a"), (2, "b"), (3, "c")))
    size = max(m.size for m in (a, b, c))
    monkeypatch.setenv("LORABAY_CACHE_BUDGET", str(2 * size + size // 2))  # room for two
    reg.pull("a")
    reg.pull("b")
    reg.pull("a")  # a cache hit: a is now the most recently used
    reg.pull("c")  # over the budget: b, the least recently used, goes
    assert cached(lorabay_home) == {a.digest_hex, c.digest_hex}
    reg.pull("b")  # fetched again (verified); now a is the oldest
    assert cached(lorabay_home) == {b.digest_hex, c.digest_hex}
    assert reg.pull_stats.fetched == 4


def test_prune_from_another_shell_keeps_what_a_process_holds(
    registry_url, lora, lorabay_home, tmp_path
):
    reg = Registry.open(registry_url)
    a = reg.push(lora(seed=1), "a").manifest
    b = reg.push(lora(seed=2), "b").manifest
    reg.pull("b")
    holder = Holder(registry_url, "a", tmp_path / "signals")
    try:
        assert holder.path == lorabay_home / "cache" / a.digest_hex
        report = prune_from_another_process(lorabay_home, "--all")
        assert [x["digest"] for x in report["removed"]] == [b.digest]
        assert [x["digest"] for x in report["in_use"]] == [a.digest]
        assert cached(lorabay_home) == {a.digest_hex}
        assert (holder.path / "adapter_model.safetensors").is_file()
        listed = json.loads(CliRunner().invoke(cli, ["hub", "cache", "ls", "--json"]).output)
        assert [(x["digest"], x["in_use"], x["ref"]) for x in listed["adapters"]] == [
            (a.digest, True, "a:1")
        ]
    finally:
        holder.release()
    report = prune_from_another_process(lorabay_home, "--all")
    assert [x["digest"] for x in report["removed"]] == [a.digest]
    assert cached(lorabay_home) == set()


def test_a_pull_under_budget_keeps_what_another_process_holds(
    registry_url, lora, lorabay_home, tmp_path, monkeypatch
):
    reg = Registry.open(registry_url)
    a = reg.push(lora(seed=1), "a").manifest
    b = reg.push(lora(seed=2), "b").manifest
    holder = Holder(registry_url, "a", tmp_path / "signals")
    try:
        monkeypatch.setenv("LORABAY_CACHE_BUDGET", "0")  # nothing unused may stay
        with reg.lease("b") as lease:
            assert cached(lorabay_home) == {a.digest_hex, b.digest_hex}
            assert (lease.path / "adapter_model.safetensors").is_file()
        reg.pull("b")  # a cache hit prunes nothing: pulls prune after fetching
        assert cached(lorabay_home) == {a.digest_hex, b.digest_hex}
    finally:
        holder.release()
    monkeypatch.delenv("LORABAY_CACHE_BUDGET")
    assert prune_from_another_process(lorabay_home, "--budget", "0")["freed"] > 0
    assert cached(lorabay_home) == set()


def test_cache_ls_and_prune_commands(registry_url, lora, lorabay_home):
    runner = CliRunner()
    reg = Registry.open(registry_url)
    a = reg.push(lora(seed=1), "team/a").manifest
    b = reg.push(lora(seed=2), "b").manifest
    reg.pull("team/a")
    reg.pull("b")
    table = runner.invoke(cli, ["hub", "cache", "ls"])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split()[:3] == ["DIGEST", "PULLED", "AS"]
    assert [line.split()[1] for line in lines[1:3]] == ["team/a:1", "b:1"]  # oldest use first
    assert "ago" in lines[1] and lines[-1].endswith(str(lorabay_home / "cache"))
    data = json.loads(runner.invoke(cli, ["hub", "cache", "ls", "--json"]).output)
    assert data["total"] == a.size + b.size and data["budget"] is None
    assert [x["size"] for x in data["adapters"]] == [a.size, b.size]
    assert all(x["in_use"] is False and x["last_used"] > 0 for x in data["adapters"])

    dry = runner.invoke(cli, ["hub", "cache", "prune", a.digest[:15], "--dry-run"])
    assert dry.exit_code == 0 and "would remove" in dry.output
    assert cached(lorabay_home) == {a.digest_hex, b.digest_hex}
    by_budget = runner.invoke(cli, ["hub", "cache", "prune", "--budget", str(b.size), "--json"])
    assert [x["ref"] for x in json.loads(by_budget.output)["removed"]] == ["team/a:1"]
    assert cached(lorabay_home) == {b.digest_hex}
    for args, fragment in (
        (["prune"], "no budget to prune to"),
        (["prune", "--budget", "lots"], "is not a size"),
        (["prune", "sha256:00000000"], "not found"),
        (["prune", "abc"], "not a digest"),
        (["prune", "--all", "--budget", "1GB"], "one of them"),
    ):
        result = runner.invoke(cli, ["hub", "cache", *args])
        assert result.exit_code == 1 and fragment in result.stderr, (args, result.output)
        assert len(result.stderr.strip().splitlines()) == 1
    assert "Example" in runner.invoke(cli, ["hub", "cache", "prune", "--help"]).output


def test_prune_removes_what_a_killed_pull_left(registry_url, lora, lorabay_home):
    reg = Registry.open(registry_url)
    reg.push(lora(seed=4), "a")
    done = run_worker(["pull", registry_url, "a"], LORABAY_FAULT="pull:file-fetched")
    assert done.returncode == -9
    cache = lorabay_home / "cache"
    assert [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")]
    prune_from_another_process(lorabay_home, "--all")
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")]


def test_the_gateway_holds_the_folders_its_engine_has_loaded(registry_url, lora, lorabay_home):
    """serve's pool keeps each loaded adapter's cache lease until the engine unloads it
    (vLLM may read the folder again): a prune from another shell keeps it meanwhile."""
    pytest.importorskip("fastapi")
    from lorabay.serve.keys import OPEN
    from lorabay.serve.pool import AdapterPool
    from lorabay.serve.resolve import ModelResolver

    reg = Registry.open(registry_url)
    a = reg.push(lora(seed=1), "a").manifest
    b = reg.push(lora(seed=2), "b").manifest
    engine: dict[str, str] = {}

    async def load(name, path) -> None:
        engine[name] = os.fspath(path)

    async def unload(name) -> None:
        engine.pop(name)

    async def use(pool, resolver, ref) -> None:
        target = await resolver.resolve(ref, OPEN)
        entry = await pool.acquire(
            target.engine_name,
            target.engine_name,
            target.labels,
            lambda: resolver.prepare(target),
        )
        pool.release(entry)
        await pool.drain()

    async def main() -> None:
        pool = AdapterPool(1, load, unload)
        resolver = ModelResolver(Registry.open(registry_url), "base", "a-hub-id")
        await use(pool, resolver, "a")
        assert list(engine.values()) == [str(lorabay_home / "cache" / a.digest_hex)]
        report = prune_from_another_process(lorabay_home, "--all")
        assert [x["digest"] for x in report["in_use"]] == [a.digest]  # loaded: kept
        await use(pool, resolver, "b")  # one adapter at most: a is unloaded
        assert list(engine.values()) == [str(lorabay_home / "cache" / b.digest_hex)]
        report = prune_from_another_process(lorabay_home, "--all")
        assert [x["digest"] for x in report["removed"]] == [a.digest]
        assert [x["digest"] for x in report["in_use"]] == [b.digest]
        pool.reset()  # the engine died: it has nothing loaded, the lease goes with it
        report = prune_from_another_process(lorabay_home, "--all")
        assert [x["digest"] for x in report["removed"]] == [b.digest]

    asyncio.run(main())
