"""`lorabay plan`: trainable parameters, adapter size and base memory, from a config.json."""

from __future__ import annotations

import json

import click

from lorabay.cli.base import resolve_base_option


@click.command(context_settings={"max_content_width": 100})
@click.option(
    "--base",
    required=True,
    callback=resolve_base_option(),
    help="A base folder or its config.json, or a pulled base's name (no weights are read).",
)
@click.option(
    "--r", "rank", type=click.IntRange(1), default=8, show_default=True, help="LoRA rank."
)
@click.option(
    "--targets",
    default="q_proj,v_proj",
    show_default=True,
    help="Modules LoRA adapts, comma-separated, or all-linear.",
)
@click.option(
    "--quantize",
    type=click.Choice(["none", "nf4"]),
    default="none",
    show_default=True,
    help="nf4: the base is loaded in 4-bit NF4 for training (QLoRA).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(base: str, rank: int, targets: str, quantize: str, as_json: bool) -> None:
    """Size a LoRA run without loading weights: trainable parameters and their share,
    adapter size on disk, base memory in bf16 and NF4, and a full fine-tune beside it.

    \b
    Example:
      lorabay plan --base smollm2-135m-instruct --r 8 --targets q_proj,v_proj
      lorabay plan --base ./llama-2-7b/config.json --r 8 --targets q_proj,v_proj
      lorabay plan --base ./tiny --r 16 --targets all-linear --quantize nf4 --json
    """
    from lorabay.train.plan import format_plan, plan_lora

    names = [t.strip() for t in targets.split(",") if t.strip()]
    result = plan_lora(base, rank, names, quantize)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        for line in format_plan(result):
            click.echo(line)
