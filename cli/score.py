"""`lorabay score`: judge each step of a solution with a process reward model."""

from __future__ import annotations

import json

import click

from lorabay.cli.base import resolve_base_option


@click.command()
@click.option(
    "--base",
    default=None,
    callback=resolve_base_option(),
    help="Base model folder, or a pulled base's name: score in this process.",
)
@click.option(
    "--endpoint",
    default=None,
    metavar="URL",
    help="A lorabay gateway (http://HOST:PORT): its engine scores, on the base it serves.",
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
    "--quantize", type=click.Choice(["none", "nf4"]), default=None, help="Load the base in NF4."
)
@click.option(
    "--api-key-env",
    default="OPENAI_API_KEY",
    show_default=True,
    help="With --endpoint: the environment variable holding the gateway's API key.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def score(
    base, endpoint, prm, prompt, steps_file, registry, quantize, api_key_env, as_json
) -> None:
    """Score each step of a solution with a process reward model (`lorabay train prm`).

    Prints the probability that each step is right, given the prompt and the steps
    before it, and the solution's score: the product of the step probabilities.
    With --base the base and the PRM load here (either format); with --endpoint a
    lorabay gateway's engine reads it (a generative PRM, the `train prm` default).

    \b
    Examples:
      lorabay score --base ./tiny --prm team/prm:1 --prompt "Praise: cat tree" --steps steps.txt
      lorabay score --base ./tiny --prm ./runs/prm/adapter --prompt "..." --steps s.json --json
      OPENAI_API_KEY=sk-... lorabay score --endpoint http://127.0.0.1:8000 --prm team/prm:1 \\
          --prompt "Praise: cat tree" --steps steps.txt
    """
    from lorabay.hub.errors import ConfigError
    from lorabay.train.score import read_steps

    if (base is None) == (endpoint is None):
        raise ConfigError(
            "give --base (score in this process) or --endpoint (through a gateway), one of them",
            "e.g. --base ./tiny, or --endpoint http://127.0.0.1:8000",
        )
    steps = read_steps(steps_file)
    if endpoint is not None:
        given = [
            flag for flag, value in (("--registry", registry), ("--quantize", quantize)) if value
        ]
        if given:
            raise ConfigError(
                f"{given[0]} is for scoring in this process: the gateway's engine and registry "
                "score with --endpoint; drop it"
            )
        from lorabay.train.label.client import read_api_key
        from lorabay.train.score import score_steps_at

        result = score_steps_at(endpoint, prm, prompt, steps, read_api_key(api_key_env))
    else:
        from lorabay.train.score import score_steps

        result = score_steps(base, prm, prompt, steps, registry, quantize or "none")
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
