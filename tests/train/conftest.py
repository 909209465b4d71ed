"""Fixtures for the training tests: toy datasets written once per session, and a helper
that trains through the same library call the CLI makes."""

from __future__ import annotations

from pathlib import Path

import pytest

# Settings that make a toy task train in seconds on the tiny base (measured on 2 shared
# cores: ~0.1-0.2 s per step on one thread). lr 1e-3 because the base is a random init
# and the adapter must build the whole behaviour; all-linear because q/v alone learn slower.
FAST = {
    "lr": 1e-3,
    "batch_size": 16,
    "targets": "all-linear",
    "dropout": 0.0,
    "threads": 1,
    "logging_steps": 5,
}


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory) -> Path:
    from lorabay.train.toy import write_toy

    folder = tmp_path_factory.mktemp("toy")
    write_toy("sentiment", folder / "chat", train=256, heldout=32, shape="messages")
    write_toy("sentiment", folder / "text", train=256, heldout=32, shape="prompt_completion")
    return folder


@pytest.fixture
def train(tiny_base):
    """``train(method, **options) -> RunResult``: build_config + the method, in-process."""

    def run(method: str, **options):
        from lorabay.train.config import DPOConfig, SFTConfig, build_config

        cls = {"sft": SFTConfig, "dpo": DPOConfig}[method]
        fast = dict(FAST)
        if options.get("from"):
            fast.pop("targets")  # the adapter's shape comes from the parent
        flags = {"base": str(tiny_base), **fast, **options}
        config = build_config(cls, flags={k: v for k, v in flags.items() if v is not None})
        if method == "sft":
            from lorabay.train.sft import train_sft

            return train_sft(config, show_progress=False)
        from lorabay.train.dpo import train_dpo

        return train_dpo(config, show_progress=False)

    return run


# -- reward models, PPO and PRMs (issue 7): trained once per session, pushed to one registry --


@pytest.fixture(scope="session")
def align(tiny_base, tmp_path_factory):
    """The toy alignment world: data (train/toy.py ``write_align_toy``), a session registry,
    and ``align.run(*args)`` that runs ``lorabay ...`` in-process and returns its JSON."""
    from aligntools import AlignWorld

    return AlignWorld(tiny_base, tmp_path_factory.mktemp("align"))
