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
