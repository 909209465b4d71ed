"""`lorabay label`: preference pairs (prefs) or revisions (revise) judged by a model under a
written constitution; the library is lorabay.train.label."""

from __future__ import annotations

import json

import click

from lorabay.train.label.run import LabelConfig
from lorabay.train.options import click_options, flags_from_click


@click.command()
@click_options(LabelConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the result (the provenance) as JSON.")
def label(as_json: bool, **params) -> None:
    """Label data with AI feedback from a written constitution (RLAIF, Constitutional AI).

    \b
    prefs:  K responses per prompt from --policy; --judge compares every pair under a
            principle, in both orders; kept pairs are DPO records with a soft score.
    revise: a response, the judge's critique under a principle, its revision: SFT records.

    Without --endpoint, `lorabay serve --base` runs for the labelling and is stopped after.
    A stopped run continues where it stopped when given the same options again. The
    provenance (models and digests, constitution sha256, settings, counts) is written
    beside --out, and `lorabay train` records it in the pushed adapter's lineage.

    \b
    Examples:
      lorabay label --base ./tiny --policy team/sft:1 --judge team/judge:1 \\
          --prompts prompts.jsonl --out labels.jsonl --samples 4
      lorabay train dpo --base ./tiny --data labels.jsonl --from team/sft:1 --push team/sft
      lorabay label --endpoint http://127.0.0.1:8000 --mode revise --policy team/sft:1 \\
          --judge tiny --constitution rules.yaml --prompts p.jsonl --out revised.jsonl
    """
    from lorabay.train.label.run import build_label_config
    from lorabay.train.label.run import label as run_label

    config = build_label_config(flags_from_click(LabelConfig, params))
    try:
        result = run_label(config, show_progress=True, notify=lambda m: click.echo(m, err=True))
    except KeyboardInterrupt:
        click.secho(
            "stopped; the prompts labelled so far are kept: run the same command to continue",
            fg="yellow",
            err=True,
        )
        raise SystemExit(130) from None
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    counts = result.counts
    if config.mode == "prefs":
        summary = (
            f"{counts['records']} pairs kept of {counts.get('pairs', 0)} "
            f"({counts['dropped_total']} dropped"
        )
        details = [
            f"{counts[k]} {k.removeprefix('dropped_').replace('_', ' ')}"
            for k in sorted(counts)
            if k.startswith("dropped_") and k != "dropped_total" and counts[k]
        ]
        summary += (": " + ", ".join(details) if details else "") + ")"
        if "first_position_rate" in counts:
            summary += f"; judge picked the first response {counts['first_position_rate']:.0%}"
    else:
        summary = f"{counts['records']} revisions ({counts['dropped_total']} dropped)"
    if counts.get("failed"):
        summary += f"; {counts['failed']} prompts refused by the endpoint"
    if result.resumed:
        summary += f"; {result.resumed} prompts from the stopped run"
    click.echo(f"{result.out}  ({summary})")
    click.echo(f"{result.provenance_file}")
