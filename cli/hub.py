"""`lorabay hub ...`: the registry's commands. Thin: parse, call lorabay.hub.Registry, print.

Every command takes ``--registry URL`` (default ``$LORABAY_REGISTRY``, else
``file://$LORABAY_HOME/registry``) and ``--json``. User errors print one line and
exit 1; usage errors exit 2 (click).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator

import click

from lorabay.cli.base import resolve_base_option
from lorabay.cli.output import print_table, printable
from lorabay.hub.manifest import KINDS

REGISTRY_HELP = "Registry URL: file://DIR, s3://BUCKET/PREFIX or oci://HOST[:PORT]/REPOSITORY [default: $LORABAY_REGISTRY, else file://$LORABAY_HOME/registry]."
SIGN_HELP = "Sign the version with this EC private key (PEM; OpenSSF model signing, offline) [default: $LORABAY_SIGNING_KEY; password in $LORABAY_SIGNING_KEY_PASSWORD]."


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
    type=click.Choice(KINDS),
    default="lora",
    show_default=True,
    help="What the adapter is: a plain LoRA, an outcome reward model or a process reward model.",
)
@click.option(
    "--sign",
    "sign_key",
    metavar="KEY",
    envvar="LORABAY_SIGNING_KEY",
    type=click.Path(dir_okay=False),
    default=None,
    help=SIGN_HELP,
)
@registry_option
@json_option
def push(folder, name, aliases, description, labels, base, kind, sign_key, registry_url, as_json):
    """Check FOLDER (a PEFT LoRA) and store it as the next version of NAME.

    Prints NAME:VERSION and the digest. Content identical to an existing version
    of NAME returns that version and creates nothing. With --sign, the version is
    signed too (a signature stored beside its manifest: `lorabay hub show`).

    \b
    Examples:
      lorabay hub push ./out/adapter team/summarize --alias prod --label task=summaries
      lorabay hub push ./out/adapter team/summarize --sign ~/.lorabay/release.key
    """
    label_map = parse_labels(labels)
    if sign_key:  # a key that cannot sign fails before anything is pushed
        from lorabay.hub.signing import PASSWORD_ENV, load_private_key

        load_private_key(sign_key, os.environ.get(PASSWORD_ENV))
    registry = open_registry(registry_url)
    with progress_bar(folder_size(folder), "hashing") as update:
        pushed = registry.push(
            folder,
            name,
            aliases=aliases,
            description=description,
            labels=label_map,
            base=base,
            kind=kind,
            progress=update,
        )
    manifest = pushed.manifest
    signed = None
    if sign_key:
        from lorabay.hub.signing import sign_version

        signed = sign_version(registry, manifest, sign_key)
    if as_json:
        facts = {**manifest.to_dict(), "ref": manifest.ref, "created": pushed.created}
        emit_json({**facts, "signed_by": signed.key_id if signed else None})
    else:
        note = "" if pushed.created else "  (unchanged: identical to this existing version)"
        note += f"  signed by {signed.key_id[:16]}" if signed else ""
        click.echo(f"{manifest.ref}  {manifest.digest}{note}")


@hub.command()
@click.argument("ref")
@click.option(
    "--key",
    "sign_key",
    metavar="KEY",
    envvar="LORABAY_SIGNING_KEY",
    type=click.Path(dir_okay=False),
    required=True,
    help=SIGN_HELP.replace("Sign the version", "Sign"),
)
@registry_option
@json_option
def sign(ref, sign_key, registry_url, as_json):
    """Sign REF, an existing version, with KEY (OpenSSF model signing over its verified files).

    The signature is stored beside the manifest; `lorabay serve --trust` and
    `lorabay hub verify REF --signed-by PUBKEY` check it.

    \b
    Example:
      lorabay hub sign team/summarize:3 --key release.key
    """
    from lorabay.hub.signing import sign_version

    signed = sign_version(open_registry(registry_url), ref, sign_key)
    m = signed.manifest
    if as_json:
        emit_json(
            {"ref": m.ref, "digest": m.digest, "key_id": signed.key_id, "created": signed.created}
        )
    else:
        note = "" if signed.created else "  (already signed by this key)"
        click.echo(f"{m.ref}  {m.digest}  signed by {signed.key_id[:16]}{note}")


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
    from lorabay.hub.listing import list_rows

    rows = list_rows(open_registry(registry_url), name, include_yanked=include_yanked)
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
    from lorabay.hub.signing import signature_summary

    signatures = signature_summary(registry, m)
    if as_json:
        facts = {**m.to_dict(), "ref": m.ref, "aliases": here, "yanked": yanked}
        emit_json({**facts, "signatures": signatures})
        return
    click.echo(f"{m.ref}{'  (yanked)' if yanked else ''}")
    pairs = [  # stored text is printed through printable(): a record must not drive the terminal
        ("digest", m.digest),
        ("kind", m.kind),
        ("aliases", ", ".join(here) or "-"),
        ("created", f"{m.created_at} by {m.created_by}"),
        ("description", m.description or "-"),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(m.labels.items())) or "-"),
        ("peft", ", ".join(f"{k}={v}" for k, v in m.peft.items())),
        ("base", describe_base_record(m.base)),
        ("base source", describe_base_source(m.base)),
        (
            "lineage",
            ", ".join(f"{k}={v}" for k, v in m.lineage.items() if v) or "- (not trained here)",
        ),
        (
            "signed by",
            ", ".join(
                s["key_id"][:16] + ("" if s["covers_manifest"] else " (not over these files!)")
                for s in signatures
            )
            or "- (unsigned)",
        ),
    ]
    for key, value in pairs:
        click.echo(f"  {key + ':':<13}{printable(value)}")
    click.echo("  files:")
    for entry in m.files:
        path = printable(entry["path"])
        click.echo(f"    {path:<32} {human_size(entry['size']):>9}  sha256:{entry['sha256'][:16]}")


def describe_base_record(base: dict) -> str:
    """``smollm2-135m-instruct (LlamaForCausalLM, 30 layers, hidden 576, vocab 49152)``."""
    shape = [
        base.get("architecture"),
        base.get("num_hidden_layers") and f"{base['num_hidden_layers']} layers",
        base.get("hidden_size") and f"hidden {base['hidden_size']}",
        base.get("vocab_size") and f"vocab {base['vocab_size']}",
    ]
    shape = ", ".join(str(part) for part in shape if part)
    name = base.get("id") or "-"
    if base.get("revision"):
        name += f"@{base['revision']}"
    return f"{name} ({shape})" if shape else name


def describe_base_source(base: dict) -> str:
    """Where a pulled base's weights came from (``lorabay base pull``), or ``-``."""
    source = base.get("source")
    if not isinstance(source, dict):
        return "-"
    parts = [source.get("uri"), source.get("sha256"), source.get("upstream")]
    return "  ".join(str(part) for part in parts if part) or "-"


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
    change = registry.yank(ref, undo=undo, reason=reason)
    m = change.manifest
    if as_json:
        emit_json({"ref": m.ref, "digest": m.digest, "yanked": not undo, "changed": change.changed})
    elif change.changed:
        click.echo(f"{'unyanked' if undo else 'yanked'} {m.ref}")
    else:
        state = "is not yanked" if undo else "is already yanked"
        click.echo(f"{m.ref} {state} (nothing changed, nothing logged)")


@hub.command()
@click.argument("ref", required=False)
@click.option(
    "--signed-by",
    "public_keys",
    multiple=True,
    metavar="PUBKEY",
    type=click.Path(dir_okay=False),
    help="Also check that REF carries a valid signature by this public key (PEM; repeatable).",
)
@registry_option
@json_option
def verify(ref, public_keys, registry_url, as_json):
    """Re-hash stored blobs (of REF, or all) and report every mismatch. Exit 1 if any.

    With --signed-by, REF's signature by each key is checked over its verified
    files (exit 1 unless every one holds).

    \b
    Examples:
      lorabay hub verify
      lorabay hub verify team/summarize:prod --signed-by release.pub
    """
    if public_keys and ref is None:
        raise click.UsageError("--signed-by needs REF: signatures are checked per version")
    from lorabay.hub.signing import PublicKey, check_signatures

    keys = [PublicKey.load(path) for path in public_keys]
    registry = open_registry(registry_url)
    with progress_bar(None, "verifying") as update:
        problems = registry.verify(ref, progress=update)
    checks = []
    if keys and not problems:
        manifest = registry.resolve(ref)
        with yank_warnings(), registry.lease(manifest) as held:
            checks = check_signatures(registry, manifest, held.path, keys)
    bad = [c for c in checks if not c.valid]
    if as_json:
        if keys:
            emit_json(
                {
                    "problems": [p.to_dict() for p in problems],
                    "signatures": [c.to_dict() for c in checks],
                }
            )
        else:
            emit_json([p.to_dict() for p in problems])
    else:
        for problem in problems:
            click.echo(f"{problem.kind}: {problem.message}")
        if not problems:
            click.echo("ok: every stored blob matches its digest")
        for check in checks:
            state = "ok: signed by" if check.valid else "not signed by"
            reason = "" if check.valid else f": {check.reason}"
            click.echo(f"{state} {check.key.key_id[:16]} ({check.key.path}){printable(reason)}")
    if problems or bad:
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

    Safe while others push, even with --grace 0: a push that commits meanwhile
    has its blobs spared or puts back what gc took (hub/upkeep.py). Two gc runs
    at once: the second is refused.

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
    pushed = import_from_hf(
        registry,
        source,
        name,
        aliases=aliases,
        description=description,
        labels=label_map,
        base=base,
    )
    m = pushed.manifest
    if as_json:
        emit_json({**m.to_dict(), "ref": m.ref, "created": pushed.created})
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


def parse_since(text: str) -> float:
    """Seconds since the epoch from a duration back from now (``2h``, ``7d``) or an ISO
    date or time (``2026-11-30``, ``2026-11-30T12:00``; UTC unless it says otherwise)."""
    from datetime import UTC, datetime

    try:
        return time.time() - parse_duration(text)
    except click.BadParameter:
        pass
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither a duration (2h, 7d) nor a date (2026-11-30[T12:00])",
            param_hint="--since",
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


@hub.command()
@click.argument("name", required=False)
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Only the newest N events.")
@click.option(
    "--since",
    metavar="WHEN",
    default=None,
    help="Only events since WHEN: a duration back from now (2h, 7d) or a date (2026-11-30).",
)
@registry_option
@json_option
def log(name, limit, since, registry_url, as_json):
    """Show the event log (pushed, aliased, yanked, removed, ...), oldest first.

    With NAME, only that adapter's events are read (they are kept by name).

    \b
    Examples:
      lorabay hub log team/summarize --since 7d
      lorabay hub log --limit 20 --json
    """
    after = parse_since(since) if since is not None else None
    events = open_registry(registry_url).events(name, limit=limit, since=after)
    if as_json:
        emit_json(events)
        return
    if not events:
        click.echo("no events" + (f" for {name}" if name else ""))
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
                str(e["at"])[:23].replace("T", " "),
                e["event"],
                e.get("name", ""),
                " ".join(f"{k}={v}" for k, v in sorted(facts.items())),
                e.get("by", ""),
            ]
        )
    print_table(["AT", "EVENT", "NAME", "DETAILS", "BY"], rows)


@hub.command("rm")
@click.argument("ref")
@click.option(
    "--drop-aliases", is_flag=True, help="Also remove the aliases that point at this version."
)
@click.option(
    "--move-aliases",
    type=click.IntRange(min=1),
    default=None,
    metavar="VERSION",
    help="Point the aliases that point at this version at VERSION instead.",
)
@click.option("--reason", default="", help="Why (kept in the event log).")
@registry_option
@json_option
def rm(ref, drop_aliases, move_aliases, reason, registry_url, as_json):
    """Delete the version REF names (a secret pushed by mistake, say).

    Its manifest goes and its number is never given out again; the event log keeps
    that it was pushed and removed. Refused while aliases point at it, unless they
    are moved or dropped with it. Its blobs go at the next `lorabay hub gc` (no
    other version may use them; `--grace 0` frees them at once), and this
    machine's cached copy goes now unless something is using it.

    \b
    Examples:
      lorabay hub rm team/summarize:4 --reason "pushed the wrong folder"
      lorabay hub rm team/summarize:4 --move-aliases 3 && lorabay hub gc --grace 0
    """
    removed = open_registry(registry_url).remove(
        ref, drop_aliases=drop_aliases, move_aliases=move_aliases, reason=reason
    )
    m = removed.manifest
    if as_json:
        emit_json({"ref": m.ref, "digest": m.digest, "removed": True, "aliases": removed.aliases})
        return
    click.echo(f"removed {m.ref}  {m.digest}")
    for alias, version in sorted(removed.aliases.items()):
        where = f"-> {m.name}:{version}" if version is not None else "removed"
        click.echo(f"  {m.name}:{alias} {where}")
    click.echo("  its blobs go at the next `lorabay hub gc` (--grace 0: now)")


@hub.group()
def cache() -> None:
    """Look at and prune the pull cache ($LORABAY_HOME/cache).

    \b
    The cache keeps every adapter pulled here, verified, by digest. With
    LORABAY_CACHE_BUDGET (e.g. 20GB) every pull prunes it to that size, least
    recently used first; a folder in use by any process (a pull, a gateway
    whose engine has the adapter loaded) is never removed.

    \b
    Examples:
      lorabay hub cache ls
      lorabay hub cache prune --budget 10GB --dry-run
    """


def age(seconds_since_epoch: float) -> str:
    seconds = max(0.0, time.time() - seconds_since_epoch)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


@cache.command("ls")
@json_option
def cache_ls(as_json):
    """List the cached adapters, least recently used first: size, last use, whether in use.

    \b
    Example:
      lorabay hub cache ls --json
    """
    from lorabay.hub.cache_prune import scan_cache
    from lorabay.hub.settings import cache_dir

    scan = scan_cache(cache_dir())
    if as_json:
        emit_json(scan.to_dict())
        return
    if not scan.adapters and not scan.manifests:
        click.echo(f"the cache at {scan.folder} is empty")
        return
    rows = [
        [
            a.digest[:19],
            a.ref or "?",
            human_size(a.size),
            age(a.last_used),
            "yes" if a.in_use else "",
            printable(a.registry or ""),
        ]
        for a in scan.adapters
    ]
    rows += [
        [
            "manifests",
            f"{m.files} copies",
            human_size(m.size),
            age(m.last_used) if m.last_used else "-",
            "",
            m.path.name,
        ]
        for m in scan.manifests
    ]
    print_table(["DIGEST", "PULLED AS", "SIZE", "LAST USED", "IN USE", "REGISTRY"], rows)
    budget = f" of a {human_size(scan.budget)} budget" if scan.budget is not None else ""
    click.echo(f"{human_size(scan.total)} in {scan.folder}{budget}")


@cache.command("prune")
@click.argument("digests", nargs=-1, metavar="[DIGEST]...")
@click.option(
    "--budget",
    metavar="SIZE",
    default=None,
    help="Keep at most SIZE (500MB, 20GB), least recently used go first "
    "[default: $LORABAY_CACHE_BUDGET].",
)
@click.option("--all", "everything", is_flag=True, help="Remove every folder not in use.")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@json_option
def cache_prune(digests, budget, everything, dry_run, as_json):
    """Remove cached adapters: those DIGEST names, else the least recently used ones past
    the budget. Folders in use by any process are kept (and listed).

    \b
    Examples:
      lorabay hub cache prune --budget 10GB
      lorabay hub cache prune sha256:3f2a9c01 --dry-run
      lorabay hub cache prune --all
    """
    from lorabay.hub.cache_prune import prune_cache
    from lorabay.hub.errors import ConfigError
    from lorabay.hub.settings import cache_budget, cache_dir, parse_size

    chosen = [bool(digests), budget is not None, everything]
    if sum(chosen) > 1:
        raise ConfigError("give DIGEST..., --budget or --all, one of them")
    limit = 0 if everything else parse_size(budget, "--budget") if budget is not None else None
    if not digests and limit is None:
        limit = cache_budget()
        if limit is None:
            raise ConfigError(
                "no budget to prune to", "pass --budget SIZE or --all, or set LORABAY_CACHE_BUDGET"
            )
    report = prune_cache(cache_dir(), budget=limit, digests=digests, dry_run=dry_run)
    if as_json:
        emit_json(report.to_dict())
        return
    verb = "would remove" if dry_run else "removed"
    for adapter in report.removed:
        click.echo(
            f"{verb} {adapter.digest[:19]}  {adapter.ref or '?'}  {human_size(adapter.size)}"
        )
    for adapter in report.in_use:
        click.echo(f"kept {adapter.digest[:19]}  {adapter.ref or '?'}  (in use)")
    if report.manifests:
        click.echo(f"{verb} {len(report.manifests)} folders of manifest copies")
    click.echo(f"{verb} {human_size(report.freed)}; the cache holds {human_size(report.total)}")


@hub.command("ui")
@registry_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8700,
    show_default=True,
    help="Port (0: any free one).",
)
@click.option(
    "--api-keys",
    "api_keys",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The key file `lorabay serve` reads: each key sees only its names. Needed off loopback.",
)
@click.option(
    "--base",
    default=None,
    callback=resolve_base_option(),
    help="A base folder (or a pulled base's name) to say which adapters fit.",
)
@click.option(
    "--max-rank",
    type=click.IntRange(min=1),
    default=None,
    help="The engine's --max-lora-rank, for the fit check.",
)
def ui(registry_url, host, port, api_keys, base, max_rank):
    """Serve the web console for a registry alone: adapters, versions, lineage.

    Open the URL it prints. The playground and traffic pages need a gateway
    (`lorabay serve` serves the same console at /ui).

    \b
    Example:
      lorabay hub ui --registry s3://models/adapters --base ./tiny
    """
    from lorabay.serve.ui.standalone import run_console

    def ready(url: str) -> None:
        click.echo(f"console on {url} (Ctrl-C stops it)")

    run_console(
        registry_url,
        host=host,
        port=port,
        api_keys=api_keys,
        base=base,
        max_rank=max_rank,
        on_ready=ready,
    )
