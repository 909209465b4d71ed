"""`lorabay hub ...`: the registry's commands. Thin: parse, call lorabay.hub.Registry, print.

Every command takes ``--registry URL`` (default ``$LORABAY_REGISTRY``, else
``file://$LORABAY_HOME/registry``) and ``--json``. User errors print one line and
exit 1; usage errors exit 2 (click).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import warnings
from collections.abc import Iterator

import click
from lorabay.cli.base import resolve_base_option

REGISTRY_HELP = "Registry URL: file://DIR or s3://BUCKET/PREFIX [default: $LORABAY_REGISTRY, else file://$LORABAY_HOME/registry]."


def registry_option(command):
    return click.option(
        "--registry", "registry_url", metavar="URL", default=None, help=REGISTRY_HELP
    )(command)


def json_option(command):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(command)


def open_registry(url: str | None):
    from lorabay.hub import Registry

    return Registry.open(url)


def emit_json(value) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=False)]
    for row in [headers, *rows]:
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)).rstrip())


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


@contextlib.contextmanager
def progress_bar(total: int | None, description: str) -> Iterator:
    """A byte progress bar on stderr, shown only on a terminal."""
    from tqdm import tqdm

    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=description,
        file=sys.stderr,
        disable=None if sys.stderr.isatty() else True,
        leave=False,
    ) as bar:
        yield bar.update


@contextlib.contextmanager
def yank_warnings() -> Iterator[None]:
    from lorabay.hub import YankedWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", YankedWarning)
        yield
    for warning in caught:
        if issubclass(warning.category, YankedWarning):
            click.secho(f"Warning: {warning.message}", fg="yellow", err=True)


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw]?)", text.strip())
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 30m, 12h, 7d or 0")
    factor = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return float(match.group(1)) * factor


def parse_labels(values: tuple[str, ...]) -> dict[str, str]:
    labels = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", param_hint="--label")
        labels[key] = val
    return labels


def folder_size(path: str) -> int:
    from pathlib import Path

    root = Path(path)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


@click.group()
def hub() -> None:
    """Push, pull, list and manage adapters in the registry.

    \b
    Examples:
      lorabay hub push ./out/adapter team/summarize --alias prod --base ./tiny
      lorabay hub pull team/summarize:prod
      lorabay hub list
      lorabay hub alias set team/summarize prod 3
    """


@hub.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.argument("name")
@click.option(
    "--alias", "aliases", multiple=True, metavar="ALIAS", help="Point ALIAS here (repeatable)."
)
@click.option("--description", default="", help="One line saying what the adapter does.")
@click.option(
    "--label", "labels", multiple=True, metavar="KEY=VALUE", help="Free-form label (repeatable)."
)
@click.option(
    "--base",
    default=None,
    callback=resolve_base_option(),
    help="The base (folder, its config.json, or a pulled base's name) the adapter was trained on; it must fit.",
)
@click.option(
    "--kind",
    type=click.Choice(["lora", "reward", "prm", "value"]),
    default="lora",
    show_default=True,
)
@registry_option
@json_option
def push(folder, name, aliases, description, labels, base, kind, registry_url, as_json):
    """Check FOLDER (a PEFT LoRA) and store it as the next version of NAME.

    Prints NAME:VERSION and the digest. Content identical to an existing version
    of NAME returns that version and creates nothing.

    \b
    Example:
      lorabay hub push ./out/adapter team/summarize --alias prod --label task=summaries
    """
    label_map = parse_labels(labels)
    registry = open_registry(registry_url)
    with progress_bar(folder_size(folder), "hashing") as update:
        manifest = registry.push(
            folder,
            name,
            aliases=aliases,
            description=description,
            labels=label_map,
            base=base,
            kind=kind,
            progress=update,
        )
    created = registry.last_push_created
    if as_json:
        emit_json({**manifest.to_dict(), "ref": manifest.ref, "created": created})
    else:
        note = "" if created else "  (unchanged: identical to this existing version)"
        click.echo(f"{manifest.ref}  {manifest.digest}{note}")


@hub.command()
@click.argument("ref")
@click.option(
    "--to",
    "to",
    type=click.Path(file_okay=False),
    default=None,
    help="Copy into this folder (absent or empty) instead of only the cache.",
)
@registry_option
@json_option
def pull(ref, to, registry_url, as_json):
    """Fetch REF, verify every file's sha256, and print the local folder.

    \b
    Example:
      lorabay hub pull team/summarize:prod --to ./adapter
    """
    registry = open_registry(registry_url)
    manifest = registry.resolve(ref)
    with yank_warnings(), progress_bar(manifest.size, "pulling") as update:
        path = registry.pull(manifest, to=to, progress=update)
    if as_json:
        emit_json({"ref": manifest.ref, "digest": manifest.digest, "path": str(path)})
    else:
        click.echo(str(path))


@hub.command("list")
@click.argument("name", required=False)
@click.option("--all", "include_yanked", is_flag=True, help="Include yanked versions.")
@registry_option
@json_option
def list_(name, include_yanked, registry_url, as_json):
    """List adapter versions (of NAME), with their aliases.

    \b
    Example:
      lorabay hub list team/summarize --all
    """
    registry = open_registry(registry_url)
    manifests = registry.list(name, include_yanked=include_yanked)
    names = sorted({m.name for m in manifests})
    aliases = registry.alias_tables(names)
    yanked = (
        {n: s.yanked for n, s in registry.version_table(name).items()} if include_yanked else {}
    )
    rows = []
    for m in manifests:
        tags = sorted(a for a, v in aliases[m.name].items() if v == m.version)
        rows.append(
            {
                "ref": m.ref,
                "name": m.name,
                "version": m.version,
                "digest": m.digest,
                "size": m.size,
                "kind": m.kind,
                "aliases": tags,
                "created_at": m.created_at,
                "yanked": m.version in yanked.get(m.name, set()),
                "description": m.description,
            }
        )
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no adapters" + (f" named {name}" if name else ""))
        return
    headers = ["NAME", "VERSION", "DIGEST", "SIZE", "KIND", "ALIASES", "CREATED"]
    table = [
        [
            r["name"],
            str(r["version"]) + (" (yanked)" if r["yanked"] else ""),
            r["digest"][:19],
            human_size(r["size"]),
            r["kind"],
            ",".join(r["aliases"]),
            r["created_at"][:19].replace("T", " "),
        ]
        for r in rows
    ]
    print_table(headers, table)


@hub.command()
@click.argument("ref")
@registry_option
@json_option
def show(ref, registry_url, as_json):
    """Show REF's manifest: files, PEFT config, base, lineage, aliases.

    \b
    Example:
      lorabay hub show team/summarize:prod
    """
    registry = open_registry(registry_url)
    m = registry.resolve(ref)
    aliases = registry.aliases(m.name)
    here = sorted(a for a, v in aliases.items() if v == m.version)
    yanked = registry.is_yanked(m)
    if as_json:
        emit_json({**m.to_dict(), "ref": m.ref, "aliases": here, "yanked": yanked})
        return
    click.echo(f"{m.ref}{'  (yanked)' if yanked else ''}")
    pairs = [
        ("digest", m.digest),
        ("kind", m.kind),
        ("aliases", ", ".join(here) or "-"),
        ("created", f"{m.created_at} by {m.created_by}"),
        ("description", m.description or "-"),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(m.labels.items())) or "-"),
        ("peft", ", ".join(f"{k}={v}" for k, v in m.peft.items())),
        ("base", ", ".join(f"{k}={v}" for k, v in m.base.items() if v is not None) or "-"),
        (
            "lineage",
            ", ".join(f"{k}={v}" for k, v in m.lineage.items() if v) or "- (not trained here)",
        ),
    ]
    for key, value in pairs:
        click.echo(f"  {key + ':':<13}{value}")
    click.echo("  files:")
    for entry in m.files:
        click.echo(
            f"    {entry['path']:<32} {human_size(entry['size']):>9}  sha256:{entry['sha256'][:16]}"
        )


@hub.group()
def alias() -> None:
    """Move or remove version aliases (compare-and-swap; every move is logged)."""


@alias.command("set")
@click.argument("name")
@click.argument("alias_name", metavar="ALIAS")
@click.argument("version", type=click.IntRange(min=1))
@registry_option
@json_option
def alias_set(name, alias_name, version, registry_url, as_json):
    """Point NAME:ALIAS at VERSION.

    \b
    Example:
      lorabay hub alias set team/summarize prod 3
    """
    registry = open_registry(registry_url)
    registry.set_alias(name, alias_name, version)
    if as_json:
        emit_json({"name": name, "alias": alias_name, "version": version})
    else:
        click.echo(f"{name}:{alias_name} -> {name}:{version}")


@alias.command("rm")
@click.argument("name")
@click.argument("alias_name", metavar="ALIAS")
@registry_option
@json_option
def alias_rm(name, alias_name, registry_url, as_json):
    """Remove NAME:ALIAS.

    \b
    Example:
      lorabay hub alias rm team/summarize canary
    """
    registry = open_registry(registry_url)
    registry.remove_alias(name, alias_name)
    if as_json:
        emit_json({"name": name, "alias": alias_name, "removed": True})
    else:
        click.echo(f"removed {name}:{alias_name}")


@hub.command()
@click.argument("ref")
@click.option("--undo", is_flag=True, help="Make the version visible again.")
@click.option("--reason", default="", help="Why (kept in the event log).")
@registry_option
@json_option
def yank(ref, undo, reason, registry_url, as_json):
    """Hide REF from `latest` and from `list` (it stays pullable by version or digest).

    \b
    Example:
      lorabay hub yank team/summarize:4 --reason "regressed on eval"
    """
    registry = open_registry(registry_url)
    m = registry.yank(ref, undo=undo, reason=reason)
    if as_json:
        emit_json({"ref": m.ref, "digest": m.digest, "yanked": not undo})
    else:
        click.echo(f"{'unyanked' if undo else 'yanked'} {m.ref}")


@hub.command()
@click.argument("ref", required=False)
@registry_option
@json_option
def verify(ref, registry_url, as_json):
    """Re-hash stored blobs (of REF, or all) and report every mismatch. Exit 1 if any.

    \b
    Example:
      lorabay hub verify
    """
    registry = open_registry(registry_url)
    with progress_bar(None, "verifying") as update:
        problems = registry.verify(ref, progress=update)
    if as_json:
        emit_json([p.to_dict() for p in problems])
    elif problems:
        for problem in problems:
            click.echo(f"{problem.kind}: {problem.message}")
    else:
        click.echo("ok: every stored blob matches its digest")
    if problems:
        sys.exit(1)


@hub.command()
@click.option(
    "--grace",
    default="24h",
    show_default=True,
    help="Keep unreferenced blobs younger than this (90s, 30m, 12h, 7d, 0).",
)
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@registry_option
@json_option
def gc(grace, dry_run, registry_url, as_json):
    """Remove blobs no manifest references, and leftovers of interrupted writes.

    \b
    Example:
      lorabay hub gc --grace 1h --dry-run
    """
    seconds = parse_duration(grace)
    report = open_registry(registry_url).gc(seconds, dry_run=dry_run)
    if as_json:
        emit_json(report.to_dict())
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(
        f"{verb} {len(report.blobs)} blobs ({human_size(report.bytes)}) and "
        f"{len(report.temporary)} temporary files"
    )


@hub.command()
@click.argument("ref")
@click.option(
    "--base",
    "base",
    required=True,
    callback=resolve_base_option(),
    help="The base folder (or its config.json), or a pulled base's name.",
)
@click.option(
    "--max-rank", type=click.IntRange(min=1), default=None, help="The engine's --max-lora-rank."
)
@registry_option
@json_option
def check(ref, base, max_rank, registry_url, as_json):
    """Say whether REF fits the base at --base, or every reason it does not (exit 1).

    \b
    Example:
      lorabay hub check team/summarize:prod --base ./tiny --max-rank 16
    """
    registry = open_registry(registry_url)
    m = registry.resolve(ref)
    with yank_warnings():
        reasons = registry.check(m, base, max_rank=max_rank)
    if as_json:
        emit_json({"ref": m.ref, "base": base, "compatible": not reasons, "reasons": reasons})
    elif reasons:
        click.echo(f"{m.ref} does not fit {base}:")
        for reason in reasons:
            click.echo(f"  - {reason}")
    else:
        click.echo(f"{m.ref} fits {base}")
    if reasons:
        sys.exit(1)


@hub.command("import")
@click.argument("source", metavar="hf://ORG/REPO[@REVISION]")
@click.argument("name")
@click.option(
    "--alias", "aliases", multiple=True, metavar="ALIAS", help="Point ALIAS here (repeatable)."
)
@click.option("--description", default=None, help="Defaults to the exported manifest's, if any.")
@click.option(
    "--label", "labels", multiple=True, metavar="KEY=VALUE", help="Free-form label (repeatable)."
)
@click.option(
    "--base",
    default=None,
    callback=resolve_base_option(),
    help="The base folder (or a pulled base's name) the adapter must fit.",
)
@registry_option
@json_option
def import_(source, name, aliases, description, labels, base, registry_url, as_json):
    """Push an adapter from a Hugging Face Hub repository (or the local HF cache offline).

    \b
    Example:
      lorabay hub import hf://org/summarize-lora@main team/summarize
    """
    from lorabay.hub.hf import import_from_hf

    label_map = parse_labels(labels)
    registry = open_registry(registry_url)
    m = import_from_hf(
        registry,
        source,
        name,
        aliases=aliases,
        description=description,
        labels=label_map,
        base=base,
    )
    if as_json:
        emit_json({**m.to_dict(), "ref": m.ref, "created": registry.last_push_created})
    else:
        click.echo(f"{m.ref}  {m.digest}  (from {m.labels['source']})")


@hub.command()
@click.argument("ref")
@click.argument("target", metavar="hf://ORG/REPO")
@click.option("--private", is_flag=True, help="Create the repository private.")
@registry_option
@json_option
def export(ref, target, private, registry_url, as_json):
    """Upload REF (verified) to a Hugging Face Hub repository, in one commit.

    Uses the token huggingface_hub finds (HF_TOKEN or `hf auth login`).

    \b
    Example:
      lorabay hub export team/summarize:prod hf://org/summarize-lora
    """
    from lorabay.hub.hf import export_to_hf

    registry = open_registry(registry_url)
    with yank_warnings():
        url = export_to_hf(registry, ref, target, private=private)
    if as_json:
        emit_json({"ref": ref, "target": target, "commit_url": url})
    else:
        click.echo(url)


@hub.command()
@click.argument("name", required=False)
@registry_option
@json_option
def log(name, registry_url, as_json):
    """Show the event log (pushed, aliased, yanked, ...), oldest first.

    \b
    Example:
      lorabay hub log team/summarize
    """
    events = open_registry(registry_url).events(name)
    if as_json:
        emit_json(events)
        return
    rows = []
    for e in events:
        facts = {
            k: v
            for k, v in e.items()
            if k not in ("event", "at", "by", "name") and v not in (None, "")
        }
        rows.append(
            [
                e["at"][:23].replace("T", " "),
                e["event"],
                e.get("name", ""),
                " ".join(f"{k}={v}" for k, v in sorted(facts.items())),
                e["by"],
            ]
        )
    print_table(["AT", "EVENT", "NAME", "DETAILS", "BY"], rows)
