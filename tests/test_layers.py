"""The import direction of docs/architecture.md: ``cli -> serve, train -> hub``.

``hub`` imports none of the others, ``serve`` and ``train`` never import each other, and
only ``cli`` may import them all. Read from the source (every ``import`` statement,
also the ones inside functions), so a lazy import breaks the rule as loudly as one at
the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {
    "hub": {"hub"},
    "train": {"hub", "train"},
    "serve": {"hub", "serve"},
    "cli": {"hub", "train", "serve", "cli"},
}


def lorabay_imports(path: Path) -> list[tuple[int, str]]:
    """(line, package) of every ``lorabay.<package>`` a module imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "lorabay" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_what_it_may(package):
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports lorabay.{target}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, target in lorabay_imports(path)
        if target not in ALLOWED[package]
    ]
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_a_lazy_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from lorabay.serve.engine import x\n")
    assert lorabay_imports(module) == [(2, "serve")]
