"""Who may import whom: the connector imports nothing of the relay, the relay nothing of the connector,
the shared packages neither, and the CLI sits on top of everything (no package imports it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAY_IMPORT = {
    "relay": {"relay", "tunnel", "ipp", "service"},
    "connector": {"connector", "tunnel", "ipp", "service"},
    "tunnel": {"tunnel", "service"},
    "ipp": {"ipp"},
    "service": {"service"},
}
OURS = {*MAY_IMPORT, "printrelay", "loadtest"}


def imported_packages(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_each_package_imports_only_what_it_may(package: str) -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) - MAY_IMPORT[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {name: bad for name, bad in wrong.items() if bad} == {}
