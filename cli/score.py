"""`lorabay score`: judge each step of a solution with a process reward model."""

from __future__ import annotations

import json

import click
from lorabay.cli.base import resolve_base_option


@click.command()
@click.option(
    "--base",
    required=True,
    callback=resolve_base_option(),
    help="Base model folder, or a pulled base's name.",
)
@click.option("--prm", required=True, help="Process reward model: registry reference or folder.")
@click.option("--prompt", required=True, help="The problem the steps solve (text).")
@click.option(
    "--steps",
    "steps_file",
    required=True,
    type=click.Path(dir_okay=False),
    help="The solution: one step per line, or a .json list of step texts.",
)
@click.option("--registry", default=None, help="Registry URL (file://DIR, s3://BUCKET/PREFIX).")
@click.option(
    "--quantize", type=click.Choice(["none", "nf4"]), default="none", help="Load the base in NF4."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def score(base, prm, prompt, steps_file, registry, quantize, as_json) -> None:
    """Score each step of a solution with a process reward model (`lorabay train prm`).

    Prints the probability that each step is right, given the prompt and the steps
    before it, and the solution's score: the product of the step probabilities.

    \b
    Examples:
      lorabay score --base ./tiny --prm team/prm:1 --prompt "Praise: cat tree" --steps steps.txt
      lorabay score --base ./tiny --prm ./runs/prm/adapter --prompt "..." --steps s.json --json
    """
    from lorabay.train.score import read_steps, score_steps

    result = score_steps(base, prm, prompt, read_steps(steps_file), registry, quantize)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    width = max(len(str(len(result.steps))), 4)
    click.echo(f"{'step':>{width}}  p(right)  text")
    for index, (text, p) in enumerate(zip(result.steps, result.probabilities, strict=True), 1):
        click.echo(f"{index:>{width}}  {p:8.4f}  {text.strip()}")
    click.echo(
        f"solution score {result.score:.4f}  (product of the step probabilities; {result.prm})"
    )
