"""Registry test helpers: adapters written in milliseconds (numpy + safetensors, no torch).

``write_lora`` writes what PEFT's ``save_pretrained`` writes for a 2-layer Llama with
hidden size 256 (the session's tiny base), so ``check`` against ``tiny_base`` passes.
The real PEFT adapters (``make_lora``) are used where it matters that PEFT wrote them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

# in/out features of the tiny base's attention projections (hidden 256, 4 heads of 64,
# 2 kv heads): q/o 256->256, k/v 256->128.
TINY_FEATURES = {
    "q_proj": (256, 256),
    "k_proj": (256, 128),
    "v_proj": (256, 128),
    "o_proj": (256, 256),
}


def write_lora(
    out: Path,
    *,
    r: int = 4,
    seed: int = 0,
    targets=("q_proj", "v_proj"),
    layers: int = 2,
    peft_type: str = "LORA",
    config_r: int | None = None,
    base: str = "tiny-base",
    pad_bytes: int = 0,
) -> Path:
    """A LoRA adapter folder; ``config_r`` makes the config disagree with the tensors."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for target in targets:
            in_f, out_f = TINY_FEATURES[target]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, in_f), dtype=np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((out_f, r), dtype=np.float32)
    if pad_bytes:  # make a big adapter: an extra LoRA pair on a fake wide module
        cols = max(1, pad_bytes // (4 * 2 * r))
        tensors["base_model.model.pad.lora_A.weight"] = rng.standard_normal(
            (r, cols), dtype=np.float32
        )
        tensors["base_model.model.pad.lora_B.weight"] = rng.standard_normal(
            (cols, r), dtype=np.float32
        )
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": peft_type,
        "r": config_r if config_r is not None else r,
        "lora_alpha": 2 * r,
        "target_modules": list(targets),
        "modules_to_save": None,
        "base_model_name_or_path": base,
        "task_type": "CAUSAL_LM",
    }
    (out / "adapter_config.json").write_text(json.dumps(config))
    (out / "README.md").write_text(f"adapter seed {seed}\n")
    return out


TAMPERED: dict[Path, bytes] = {}  # OCI blobs changed on the registry's disk: their bytes


def overwrite(store, key: str, data: bytes) -> None:
    """Change a stored object behind the registry's back (tamper tests)."""
    if hasattr(store, "local_path"):
        path = store.local_path(key)
        path.chmod(0o644)
        path.write_bytes(data)
    elif store.url.startswith("oci://"):
        # A blob's bytes are addressed by their digest, which no API call can break: change
        # them on the registry's disk. A record is a tag, rewritten with other bytes.
        from ociserver import SERVERS

        if key.startswith("blobs/sha256/"):
            path = SERVERS[store.host].blob_path(store.repo, key.rsplit("/", 1)[1])
            # One blob serves every repository of the server: put it back after the test
            # (restore_tampered_blobs in conftest.py), or later tests would meet the damage.
            TAMPERED.setdefault(path, path.read_bytes())
            path.write_bytes(data)
        else:
            tagged = store.read_tagged(key)
            store.swap(key, data, tagged[1] if tagged else None)
    else:
        store.client.put_object(Bucket=store.bucket, Key=store.key(key), Body=data)


WORKER = Path(__file__).with_name("worker.py")


def run_together(argument_lists: list[list[str]], go: Path, timeout: float = 120) -> list[dict]:
    """Start one worker per argument list, release them all at once, return their outputs."""
    import json
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "LORABAY_TEST_GO": str(go)}
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in argument_lists
    ]
    try:
        deadline = time.monotonic() + timeout
        while len(list(go.parent.glob(go.name + ".ready-*"))) < len(processes):
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                break
            time.sleep(0.01)
        go.touch()
        outputs = [p.communicate(timeout=timeout) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, f"worker failed ({p.returncode}): {err[-2000:]}"
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def run_worker(args: list[str], **env_extra):
    import os
    import subprocess
    import sys

    env = {**os.environ, **env_extra}
    env.pop("LORABAY_TEST_GO", None)
    return subprocess.run(
        [sys.executable, str(WORKER), *args], env=env, capture_output=True, text=True, timeout=120
    )
