"""`lorabay base create`: a base model built from scratch, no download."""

from __future__ import annotations

import json

import click


@click.group()
def base() -> None:
    """Build base models locally (for tests, the demo and benchmarks)."""


@base.command("create")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--size",
    type=click.Choice(["tiny", "small"]),
    default="tiny",
    show_default=True,
    help="tiny: ~2M parameters, float32, seconds; small: ~155M parameters, bf16.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--overwrite", is_flag=True, help="Replace DIRECTORY if it is not empty.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def create(directory: str, size: str, seed: int, overwrite: bool, as_json: bool) -> None:
    """Create a Llama-architecture base with a BPE tokenizer and a chat template.

    \b
    Example:
      lorabay base create ./tiny --size tiny --seed 0
    """
    from lorabay.train.base import count_parameters, create_base

    path = create_base(directory, size=size, seed=seed, overwrite=overwrite)
    result = {"path": str(path), "size": size, "seed": seed, "parameters": count_parameters(path)}
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{path}  ({size}, {result['parameters']:,} parameters, seed {seed})")
