"""Run configs: the recipe and the flags are one dataclass; every problem is reported at once."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from lorabay.cli.main import cli
from lorabay.hub.errors import ConfigError
from lorabay.train.config import (
    DPOConfig,
    RLHFConfig,
    SFTConfig,
    TrainerOptions,
    build_config,
    hyperparameters,
)
from lorabay.train.methods import METHODS
from lorabay.train.options import config_fields


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n')
    return path


def test_every_field_has_help_and_a_flag_and_every_flag_a_field():
    from lorabay.cli.train import train

    for name, method in METHODS.items():
        command = train.commands[name]
        flags = {opt for param in command.params for opt in param.opts} - {"--config", "--json"}
        flags -= {"-h", "--help"}
        specs = config_fields(method.config)
        for spec in specs:
            assert spec.help.strip(), spec.name
        # A flag per option and nothing else (a bool's --no-X is its other half).
        assert {f for f in flags if not f.startswith("--no-")} == {s.flag for s in specs}, name
    assert "--beta" not in {o for p in train.commands["sft"].params for o in p.opts}  # DPO only


TRAINER_ONLY = ["--save-steps", "--keep-checkpoints", "--gradient-checkpointing", "--dropout"]
TRAINER_ONLY += ["--resume", "--nproc", "--grad-accum"]


def test_rlhf_shows_and_records_only_what_it_uses(tiny_base, tmp_path):
    """PPO is our own loop, not the Trainer: no Trainer option in its --help, none in its
    lineage (each was once accepted, ignored and recorded as if it had applied)."""
    shown = CliRunner().invoke(cli, ["train", "rlhf", "--help"]).output
    sft_shown = CliRunner().invoke(cli, ["train", "sft", "--help"]).output
    for flag in [*TRAINER_ONLY, "--algo"]:
        assert flag not in shown, flag
    for flag in TRAINER_ONLY:
        assert flag in sft_shown, flag  # the Trainer's runs keep them

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    flags = {"base": str(tiny_base), "prompts": str(prompts), "reward": str(tmp_path)}
    (tmp_path / "adapter_config.json").write_text("{}")
    recorded = hyperparameters(build_config(RLHFConfig, flags=flags))
    trainer_keys = {spec.key for spec in config_fields(TrainerOptions)}
    assert not trainer_keys & set(recorded) and "algo" not in recorded
    assert {"kl_coef", "ppo_epochs", "lr", "r"} <= set(recorded)

    # A recipe written for a Trainer run says why each of those is refused here.
    with pytest.raises(ConfigError) as caught:
        build_config(RLHFConfig, {**flags, "resume": True, "grad_accum": 2, "dropout": 0.1})
    text = str(caught.value)
    assert "--resume: rlhf runs keep no checkpoints" in text and "use --mini-batches" in text
    assert "--dropout: PPO samples and updates with dropout off" in text


def test_recipe_and_flags_are_the_same_fields_and_flags_win(tmp_path, tiny_base, data):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"base: {tiny_base}\ndata: {data}\nlr: 1e-3\ngrad-accum: 2\ntargets: [q_proj, k_proj]\nr: 4\n"
    )
    config = build_config(SFTConfig, recipe, {"r": "16", "targets": None})
    assert config.lr == 1e-3  # YAML reads "1e-3" as text: converted to the field's type
    assert config.grad_accum == 2  # dashes and underscores name the same key
    assert config.r == 16  # the flag overrides the recipe
    assert config.targets == ["q_proj", "k_proj"]  # a flag not given leaves the recipe's value
    assert config.alpha == 16 and config.epochs == 3.0  # defaults from the dataclass


def test_every_problem_at_once_each_naming_its_option(tiny_base, data):
    with pytest.raises(ConfigError) as caught:
        build_config(
            SFTConfig,
            {"data": str(data), "lr": "fast", "bogus": 1, "lora_rank": 8},
            {"r": "0", "quantize": "nf8", "epochs": "2", "max_steps": "10", "alias": "prod"},
        )
    problems = caught.value.problems
    text = "\n".join(problems)
    assert len(problems) == 8, text
    for expected in (
        "unknown recipe key 'bogus'",
        "unknown recipe key 'lora_rank'",
        "--lr must be a number, got 'fast'",
        "--base is required",
        "--r must be at least 1",
        "--quantize must be one of none, nf4",
        "--epochs and --max-steps both given",
        "--alias needs --push",
    ):
        assert expected in text, expected


def test_conflicts_and_run_folder_checks(tmp_path, tiny_base, data):
    base = {"base": str(tiny_base), "data": str(data)}
    with pytest.raises(ConfigError) as caught:
        build_config(
            DPOConfig, base, {"from": "team/x:1", "r": "16", "targets": "all-linear,q_proj"}
        )
    text = str(caught.value)
    assert "--r conflicts with --from" in text and "--targets conflicts with --from" in text
    assert "all-linear already means every linear layer" in text

    output = tmp_path / "run"
    (output / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds an earlier run: pass --resume"):
        build_config(SFTConfig, base, {"output": str(output)})
    with pytest.raises(ConfigError, match="no checkpoint in"):
        build_config(SFTConfig, base, {"output": str(output), "resume": True})
    with pytest.raises(ConfigError, match="--resume and --overwrite"):
        build_config(SFTConfig, base, {"output": str(output), "resume": True, "overwrite": True})
    assert build_config(SFTConfig, base, {"output": str(output), "overwrite": True}).overwrite


def test_cli_reports_all_problems_in_one_line(tmp_path, data):
    result = CliRunner().invoke(
        cli, ["train", "sft", "--data", str(data), "--lr", "x", "--r", "-1", "--dropout", "2"]
    )
    assert result.exit_code == 1
    line = result.output.strip()
    assert "\n" not in line and line.startswith("Error: 4 problems")
    assert "--base is required" in line and "--lr must be a number" in line


def test_unknown_recipe_key_suggests_the_right_one(tmp_path, tiny_base, data):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {tiny_base}\ndata: {data}\nlearning_rate: 0.1\nbatchsize: 4\n")
    result = CliRunner().invoke(cli, ["train", "sft", "--config", str(recipe)])
    assert result.exit_code == 1
    assert "unknown recipe key 'batchsize' (did you mean 'batch_size'?)" in result.output


def test_help_shows_the_default_a_run_without_the_flag_uses():
    from lorabay.cli.train import train

    result = CliRunner().invoke(cli, ["train", "dpo", "--help"])
    assert result.exit_code == 0 and "--beta" in result.output
    helps = {opt: param.help for param in train.commands["dpo"].params for opt in param.opts}
    ran = DPOConfig()  # what a run given no flags trains with
    for spec in config_fields(DPOConfig):
        value = getattr(ran, spec.name)
        shown = ",".join(value) if isinstance(value, list) else value
        if shown in (None, ""):
            assert "[default:" not in helps[spec.flag], spec.flag
        else:
            assert helps[spec.flag].endswith(f"[default: {shown!s}]"), (spec.flag, shown)
    assert helps["--lr"].endswith("[default: 5e-05]")  # DPO's own, not every method's 2e-4


def test_registry_names_are_checked_before_training(tiny_base, data):
    base = {"base": str(tiny_base), "data": str(data)}
    with pytest.raises(ConfigError) as caught:
        build_config(DPOConfig, base, {"push": "Team/X", "alias": "prod,3", "from": "a:b:c@"})
    text = str(caught.value)
    assert "--push 'Team/X'" in text and "--alias '3'" in text and "--from 'a:b:c@'" in text
