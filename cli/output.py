"""What commands print for people: tables whose cells cannot drive the terminal.

    print_table(["NAME", "VERSION"], [["team/a", "3"]])
    print_table(["prompt", "answer"], rows, width=44)   # long cells cut with "..."

Scripts get ``--json`` instead (each command's own ``emit_json``).
"""

from __future__ import annotations

import unicodedata

import click


def printable(value) -> str:
    """``value`` as text a terminal shows as it is: control and formatting characters
    (escape sequences, bidi overrides) from stored records or model answers are written
    as escapes."""
    from lorabay.hub.content import UNPRINTABLE

    text = str(value)
    if all(unicodedata.category(c) not in UNPRINTABLE for c in text):
        return text
    return "".join(
        (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        if unicodedata.category(c) in UNPRINTABLE
        else c
        for c in text
    )


def print_table(headers: list[str], rows: list[list], width: int | None = None) -> None:
    """Left-aligned columns two spaces apart, the header in bold (on a terminal); a cell
    longer than ``width`` characters is cut and ends in "..."."""

    def cell(value) -> str:
        text = printable(value)
        return text if width is None or len(text) <= width else text[: width - 3] + "..."

    rows = [[cell(x) for x in row] for row in rows]
    widths = [max(len(x) for x in column) for column in zip(headers, *rows, strict=False)]

    def line(row: list[str]) -> str:
        return "  ".join(x.ljust(w) for x, w in zip(row, widths, strict=False)).rstrip()

    click.secho(line(headers), bold=True)
    for row in rows:
        click.echo(line(row))
