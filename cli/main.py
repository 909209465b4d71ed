"""The `lorabay` command: a click group whose subcommands load lazily.

Subcommand modules import torch, vLLM or boto3 only inside their functions, and
are imported only when named, so `lorabay --help` answers in a fraction of a
second. A command module that is not in this checkout is simply not listed.

Every :class:`lorabay.hub.errors.LorabayError` becomes one line on stderr and
exit code 1 (usage errors stay click's, exit code 2); ``LORABAY_DEBUG=1`` shows
the traceback instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.metadata import version

import click

from lorabay.hub.errors import LorabayError
from lorabay.hub.settings import debug

# name -> (module, attribute, one-line help shown by `lorabay --help`)
COMMANDS = {
    "base": (
        "lorabay.cli.base",
        "base",
        "Pull a real base model, or build a toy one from scratch.",
    ),
    "hub": ("lorabay.cli.hub", "hub", "Push, pull, list and manage adapters in the registry."),
    "serve": (
        "lorabay.cli.serve",
        "serve",
        "Serve one base and the registry's adapters, OpenAI-compatible.",
    ),
    "train": ("lorabay.cli.train", "train", "Train a LoRA adapter (sft, dpo, reward, rlhf, prm)."),
    "label": (
        "lorabay.cli.label",
        "label",
        "Label data with AI feedback from a written constitution (DPO pairs, revisions).",
    ),
    "plan": (
        "lorabay.cli.plan",
        "plan",
        "Size a LoRA run from a config.json, without loading weights.",
    ),
    "score": ("lorabay.cli.score", "score", "Score solution steps with a process reward model."),
    "demo": (
        "lorabay.cli.demo",
        "demo",
        "Train two adapters, serve them on an NF4 base, move an alias.",
    ),
}


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        lazy = [name for name, (module, _, _) in COMMANDS.items() if _available(module)]
        return sorted(set(super().list_commands(ctx)) | set(lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in COMMANDS and _available(COMMANDS[name][0]):
            module, attribute, _ = COMMANDS[name]
            return getattr(importlib.import_module(module), attribute)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help from the table above, so listing commands imports none of them.
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx) if name in COMMANDS]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LorabayError as error:
            if debug():
                raise
            click.secho(f"Error: {error}", fg="red", err=True)
            sys.exit(1)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version("lorabay"), prog_name="lorabay")
def cli() -> None:
    """lorabay: train LoRA adapters, keep them in a registry, serve them by name.

    \b
    Examples:
      lorabay base create ./tiny --size tiny
      lorabay hub push ./my-adapter team/summarize --alias prod
      lorabay serve --base ./tiny --quantization nf4
    """


def main() -> None:
    cli(prog_name="lorabay")


if __name__ == "__main__":
    main()
