"""A separate process doing one registry operation (the concurrency and crash tests).

    python worker.py push URL FOLDER NAME
    python worker.py alias URL NAME ALIAS VERSION
    python worker.py pull URL REF
    python worker.py hold URL REF DIR    (pull and hold the cached folder until DIR/release)

With ``LORABAY_TEST_GO=PATH`` it first writes ``PATH.ready-<pid>`` and waits for PATH
to exist, so the test can release all workers at the same instant. Prints one JSON line.
"""

import json
import os
import sys
import time
from pathlib import Path


def wait_for_go() -> None:
    go = os.environ.get("LORABAY_TEST_GO")
    if not go:
        return
    Path(f"{go}.ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            sys.exit("never released")
        time.sleep(0.002)


def main(action: str, url: str, *args: str) -> None:
    from lorabay.hub import Registry

    registry = Registry.open(url)
    wait_for_go()
    if action == "push":
        folder, name = args
        m = registry.push(folder, name).manifest
        print(json.dumps({"ref": m.ref, "digest": m.digest, "version": m.version}))
    elif action == "alias":
        name, alias, version = args
        registry.set_alias(name, alias, int(version))
        print(json.dumps({"alias": alias, "version": int(version)}))
    elif action == "pull":
        (ref,) = args
        path = registry.pull(ref)
        stats = registry.pull_stats
        print(json.dumps({"path": str(path), "fetched": stats.fetched, "hits": stats.cache_hits}))
    elif action == "hold":
        ref, signals = args
        with registry.lease(ref) as lease:
            Path(signals, "held").write_text(str(lease.path))
            deadline = time.monotonic() + 120
            while not Path(signals, "release").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        print(json.dumps({"path": str(lease.path)}))
    else:
        sys.exit(f"unknown action {action}")


if __name__ == "__main__":
    main(*sys.argv[1:])
