"""Registry benchmark: push/pull against `cp -r`, resolve latency and list time, per store.

    .venv/bin/python bench/hub_bench.py                      # file://, s3:// and oci://
    .venv/bin/python bench/hub_bench.py --stores file --adapters 200 --size-mib 16

In one run, on one disk (a temporary folder under --workdir):
- push and pull of a --size-mib adapter (pull into an empty cache, every sha256
  verified) against `cp -r` of the same files; ratio = cp time / lorabay time
  (goal for pull on file://: >= 0.5); on S3 also against boto3's download_file of the
  same blobs (unverified) and the pull's own ranged GETs with the bytes dropped (the
  floor: the server shares the machine's cores);
- resolve p50/p99 with --adapters adapters in the registry, from one long-lived
  Registry (as the gateway holds it), for `name:prod` (alias) and `name` (latest);
  baseline: one raw read of the alias file / object (the floor any resolve pays);
  goal on file://: p50 <= 5 ms;
- `hub list` (every manifest and alias table) of all adapters from a fresh Registry on
  another machine, as the pushes left the registry (on S3 it reads their packs:
  hub/packs.py); on S3 also the first reader of a registry without packs (one GET per
  record, then it packs them) and a new process after it; baseline: one LIST and a raw
  read of every record; goal <= 1 s.
The s3:// runs start SeaweedFS (`weed mini`, loopback, free ports) with its data on the
same disk, using tests/s3server.py; the oci:// runs start Debian's docker-registry (CNCF
distribution, loopback, a free port) with its storage on the same disk, using
tests/ociserver.py (an OCI registry has no packs: its rows show one GET per record). Prints
a markdown table (bench/README.md keeps the latest one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from benchbase import load_average
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent


def make_adapter(out: Path, size_bytes: int, seed: int) -> Path:
    """A valid LoRA folder of about ``size_bytes`` (random float32 A/B pairs, r=8)."""
    rng = np.random.default_rng(seed)
    r, width = 8, 4096
    pairs = max(1, size_bytes // (4 * 2 * r * width))
    tensors = {}
    for i in range(pairs):
        prefix = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, width), dtype=np.float32)
        tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((width, r), dtype=np.float32)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj"]}
    (out / "adapter_config.json").write_text(json.dumps(config))
    (out / "README.md").write_text(f"benchmark adapter {seed}\n")
    return out


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def drop_tree(path: Path) -> None:
    if path.exists():
        for p in path.rglob("*"):
            if p.is_file():
                p.chmod(0o644)
        shutil.rmtree(path)


def one_transfer(reg, work: Path, size_mib: int, index: int) -> dict:
    from lorabay.hub.content import sha256_file
    from lorabay.hub.settings import cache_dir

    folder = make_adapter(work / f"big-{index}", size_mib << 20, seed=10_000 + index)
    target = work / f"cp-{index}"
    times = {
        "cp": timed(lambda: subprocess.run(["cp", "-r", str(folder), str(target)], check=True))
    }
    drop_tree(target)
    started = time.perf_counter()
    manifest = reg.push(folder, f"big-{index}").manifest
    times["push"] = time.perf_counter() - started
    drop_tree(cache_dir())
    times["pull"] = timed(lambda: reg.pull(manifest))
    times["warm"] = timed(lambda: reg.pull(manifest))  # cache hit: re-hashed
    weights = cache_dir() / manifest.digest_hex / "adapter_model.safetensors"
    times["sha256"] = timed(lambda: sha256_file(weights))  # the floor of any verified pull
    remote = not hasattr(reg.store, "local_path")  # s3:// and oci://: a server, not a disk
    if hasattr(reg.store, "client"):  # S3: what boto3's own download (s3transfer) takes
        store, into = reg.store, work / f"boto-{index}"
        into.mkdir()

        def download() -> None:
            for entry in manifest.files:
                key = store.key(f"blobs/sha256/{entry['sha256']}")
                store.client.download_file(store.bucket, key, str(into / entry["path"]))

        times["boto3"] = timed(download)
        drop_tree(into)
    if remote:
        store = reg.store

        def bare_gets() -> None:  # the pull's own ranged GETs, bytes dropped: its floor here
            from lorabay.hub import pieces

            jobs = []
            for entry in manifest.files:
                key = f"blobs/sha256/{entry['sha256']}"
                jobs += [(key, *span) for span in pieces.spans(entry["size"])]
            with ThreadPoolExecutor(store.concurrent_reads) as pool:
                list(pool.map(lambda job: sum(map(len, store.read_range(*job))), jobs))

        times["gets"] = timed(bare_gets)
    drop_tree(folder)
    times["bytes"] = manifest.size
    return times


def bench_transfer(reg, work: Path, size_mib: int, repeats: int) -> dict:
    """Median push and cold pull times vs `cp -r` of the same folder on the same disk."""
    runs = [one_transfer(reg, work, size_mib, i) for i in range(repeats)]
    median = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return {
        "bytes": runs[0]["bytes"],
        "push_s": median("push"),
        "pull_s": median("pull"),
        "pull_cached_s": median("warm"),
        "cp_s": median("cp"),
        "sha256_s": median("sha256"),
        "boto3_s": median("boto3") if "boto3" in runs[0] else None,
        "gets_s": median("gets") if "gets" in runs[0] else None,
    }


def populate(reg, work: Path, count: int, threads: int) -> list[str]:
    names = [f"bench/a{i:04d}" for i in range(count)]
    tiny = work / "tiny"

    def push_one(index: int) -> None:
        folder = tiny / str(index)
        rng = np.random.default_rng(index)
        folder.mkdir(parents=True)
        tensors = {
            "base_model.model.m.q_proj.lora_A.weight": rng.standard_normal(
                (1, 16), dtype=np.float32
            ),
            "base_model.model.m.q_proj.lora_B.weight": rng.standard_normal(
                (16, 1), dtype=np.float32
            ),
        }
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj"]}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        reg.push(folder, names[index], aliases=["prod"])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(push_one, range(count)))
    shutil.rmtree(tiny)
    return names


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_resolve(reg, names: list[str], resolves: int) -> dict:
    from lorabay.hub.registry import alias_key

    rng = random.Random(0)
    results = {}
    for label, suffix in (("alias", ":prod"), ("latest", "")):
        samples = []
        for _ in range(resolves):
            ref = rng.choice(names) + suffix
            started = time.perf_counter()
            reg.resolve(ref)
            samples.append(time.perf_counter() - started)
        results[label] = (percentile(samples, 0.5), percentile(samples, 0.99))
    raw = []
    for _ in range(resolves):
        key = alias_key(rng.choice(names))
        started = time.perf_counter()
        reg.store.read(key)
        raw.append(time.perf_counter() - started)
    results["raw"] = (percentile(raw, 0.5), percentile(raw, 0.99))
    return results


def hub_list(reg) -> list:
    """What `lorabay hub list` reads: every manifest and every alias table."""
    manifests = reg.list()
    reg.alias_tables({m.name for m in manifests})
    return manifests


def bench_list(url: str, expected: int) -> dict:
    """`hub list` from a fresh Registry (a new process on another machine: no local copies):
    as the pushes left the registry (on S3: their packs), then the first reader of a
    registry that has no packs (written by a lorabay without them: one GET per record, then
    it packs them), a new process after it, and the same process again."""
    from lorabay.hub import Registry, packs
    from lorabay.hub.settings import cache_dir

    def elsewhere() -> Registry:  # client set up outside the timing, as for the baseline
        shutil.rmtree(cache_dir() / "manifests", ignore_errors=True)
        return Registry.open(url)

    listed = []
    pushed_reg = elsewhere()
    pack_count = len(pushed_reg.store.list(packs.PREFIX))
    pushed = timed(lambda: listed.extend(hub_list(pushed_reg)))
    assert len(listed) >= expected, (len(listed), expected)
    setup = elsewhere()
    for pack in setup.store.list(packs.PREFIX):
        setup.store.delete(pack.key)
    first_reg = elsewhere()
    first = timed(lambda: hub_list(first_reg))
    fresh = elsewhere()
    again = timed(lambda: hub_list(fresh))
    warm = timed(lambda: hub_list(fresh))
    raw_reg = Registry.open(url)
    keys = [i.key for i in raw_reg.store.list("adapters/") if i.key.endswith(".json")]
    keys += [i.key for i in raw_reg.store.list("aliases/")]
    workers = getattr(raw_reg.store, "concurrent_reads", 1)

    def read_all():
        raw_reg.store.list("adapters/")
        raw_reg.store.list("aliases/")
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(raw_reg.store.read, keys))

    raw = timed(read_all)
    return {
        "pushed_s": pushed,
        "packs": pack_count,
        "first_s": first,
        "again_s": again,
        "warm_s": warm,
        "raw_s": raw,
        "count": len(listed),
    }


def run_store(kind: str, url: str, work: Path, args) -> list[list[str]]:
    from lorabay.hub import Registry

    reg = Registry.open(url)
    print(f"[{kind}] push/pull {args.size_mib} MiB x{args.repeats} ...", file=sys.stderr)
    transfer = bench_transfer(reg, work, args.size_mib, args.repeats)
    print(f"[{kind}] pushing {args.adapters} adapters ...", file=sys.stderr)
    started = time.perf_counter()
    names = populate(reg, work, args.adapters, 1 if kind == "file" else 8)
    populate_s = time.perf_counter() - started
    print(f"[{kind}]   took {populate_s:.1f}s", file=sys.stderr)
    resolve = bench_resolve(reg, names, args.resolves)
    listing = bench_list(url, args.adapters)

    ms = lambda s: f"{s * 1000:.2f} ms"  # noqa: E731
    mib_s = lambda s: f"{transfer['bytes'] / s / 2**20:.0f} MiB/s"  # noqa: E731
    rows = [
        [
            kind,
            f"push {args.size_mib} MiB",
            f"{ms(transfer['push_s'])} ({mib_s(transfer['push_s'])})",
            f"cp -r {ms(transfer['cp_s'])}",
            f"{transfer['cp_s'] / transfer['push_s']:.2f}x",
            "-",
        ],
        [
            kind,
            f"pull {args.size_mib} MiB (empty cache, verified)",
            f"{ms(transfer['pull_s'])} ({mib_s(transfer['pull_s'])})",
            f"cp -r {ms(transfer['cp_s'])}",
            f"{transfer['cp_s'] / transfer['pull_s']:.2f}x",
            ok(transfer["cp_s"] / transfer["pull_s"] >= 0.5, ">= 0.5x")
            if transfer["gets_s"] is None
            else f"n/a: cp reads a local disk; the store's bare GETs reach "
            f"{transfer['cp_s'] / transfer['gets_s']:.2f}x",
        ],
    ]
    if transfer["boto3_s"] is not None:
        rows.append(
            [
                kind,
                f"pull {args.size_mib} MiB (empty cache, verified)",
                ms(transfer["pull_s"]),
                f"boto3 download_file, unverified {ms(transfer['boto3_s'])}",
                f"{transfer['boto3_s'] / transfer['pull_s']:.2f}x",
                "-",
            ]
        )
        rows.append(
            [
                kind,
                "the pull's ranged GETs alone, bytes dropped (its floor on this machine)",
                ms(transfer["gets_s"]),
                f"cp -r {ms(transfer['cp_s'])}",
                f"{transfer['cp_s'] / transfer['gets_s']:.2f}x",
                "-",
            ]
        )
    rows += [
        [
            kind,
            f"one sha256 pass over the {args.size_mib} MiB (the floor without pieces)",
            ms(transfer["sha256_s"]),
            f"cp -r {ms(transfer['cp_s'])}",
            f"{transfer['cp_s'] / transfer['sha256_s']:.2f}x",
            "-",
        ],
        [
            kind,
            "pull again (cache hit, re-hashed)",
            ms(transfer["pull_cached_s"]),
            f"cp -r {ms(transfer['cp_s'])}",
            f"{transfer['cp_s'] / transfer['pull_cached_s']:.2f}x",
            "-",
        ],
    ]
    for label, key in (("resolve name:prod", "alias"), ("resolve name (latest)", "latest")):
        p50, p99 = resolve[key]
        goal = ok(p50 <= 0.005, "p50 <= 5 ms") if kind == "file" else "-"
        rows.append(
            [
                kind,
                f"{label}, {args.adapters} adapters",
                f"p50 {ms(p50)}, p99 {ms(p99)}",
                f"raw read p50 {ms(resolve['raw'][0])}",
                f"{p50 / resolve['raw'][0]:.1f}x the floor",
                goal,
            ]
        )
    count = listing["count"]
    rows.append(
        [
            kind,
            f"push {args.adapters} tiny adapters with an alias"
            + {"file": "", "s3": f" (8 threads, {listing['packs']} packs left)"}.get(
                kind, " (8 threads)"
            ),
            f"{populate_s:.1f} s ({populate_s / args.adapters * 1000:.1f} ms each)",
            "-",
            "-",
            "-",
        ]
    )
    label = "new process, another machine" + (": the pushes' packs" if kind == "s3" else "")
    rows.append(
        [
            kind,
            f"hub list {count} adapters + aliases ({label})",
            ms(listing["pushed_s"]),
            f"list + raw reads {ms(listing['raw_s'])}",
            f"{listing['raw_s'] / listing['pushed_s']:.2f}x",
            ok(listing["pushed_s"] <= 1.0, "<= 1 s"),
        ]
    )
    if kind == "s3":
        rows.append(
            [
                kind,
                f"hub list {count} adapters + aliases (no packs: a registry written before "
                "them; GET each, then packs them)",
                ms(listing["first_s"]),
                f"list + raw reads {ms(listing['raw_s'])}",
                f"{listing['raw_s'] / listing['first_s']:.2f}x",
                "-",
            ]
        )
        rows.append(
            [
                kind,
                f"hub list {count} adapters + aliases (new process after that reader)",
                ms(listing["again_s"]),
                f"list + raw reads {ms(listing['raw_s'])}",
                f"{listing['raw_s'] / listing['again_s']:.2f}x",
                ok(listing["again_s"] <= 1.0, "<= 1 s"),
            ]
        )
    rows.append(
        [
            kind,
            f"hub list {count} adapters + aliases (same process again)",
            ms(listing["warm_s"]),
            "-",
            "-",
            "-",
        ]
    )
    return rows


def ok(met: bool, goal: str) -> str:
    return f"{goal}: {'met' if met else 'MISSED'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stores", default="file,s3,oci", help="Comma list: file, s3, oci.")
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7, help="Push/pull repetitions (median).")
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--resolves", type=int, default=2000)
    parser.add_argument("--workdir", default=None, help="Where the temp folder goes (one disk).")
    args = parser.parse_args()

    work_root = Path(tempfile.mkdtemp(prefix="lorabay-hub-bench-", dir=args.workdir))
    os.environ["LORABAY_HOME"] = str(work_root / "home")
    os.environ.pop("LORABAY_REGISTRY", None)
    rows: list[list[str]] = []
    servers = []
    load_before = os.getloadavg()
    try:
        for kind in args.stores.split(","):
            work = work_root / kind
            work.mkdir()
            os.environ["LORABAY_HOME"] = str(work / "home")
            if kind == "file":
                url = f"file://{work / 'registry'}"
            elif kind == "s3":
                sys.path.insert(0, str(ROOT / "tests"))
                from s3server import start_s3_server

                server = start_s3_server(work / "seaweedfs")
                servers.append(server)
                os.environ.update(server.env())
                url = f"s3://{server.bucket}/bench"
            elif kind == "oci":
                sys.path.insert(0, str(ROOT / "tests"))
                from ociserver import start_oci_server

                server = start_oci_server(work / "oci", storage=work / "oci-storage")
                servers.append(server)
                url = server.url("lorabay/bench")
            else:
                parser.error(f"unknown store {kind!r}")
            rows += run_store(kind, url, work, args)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work_root, ignore_errors=True)

    headers = ["store", "operation", "lorabay", "baseline (same run)", "ratio", "goal"]
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}; {load_average(load_before)}\n"
    )
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
