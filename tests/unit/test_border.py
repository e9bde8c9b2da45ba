"""The architecture's border rules, checked on the source tree (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_roots(package: str) -> dict[str, set[str]]:
    """file -> top-level module names it imports."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        roots: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                roots.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = roots
    return out


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("protocols", {"torch", "flwr", "node", "coordinator", "federation"}),
        ("node", {"coordinator", "federation"}),
        ("coordinator", {"node", "federation", "torch"}),
    ],
)
def test_package_does_not_import_across_the_border(package: str, forbidden: set[str]) -> None:
    files = imported_roots(package)
    assert files, f"no sources found under {package}/"
    offenders = {f: sorted(roots & forbidden) for f, roots in files.items() if roots & forbidden}
    assert offenders == {}


def test_importing_protocols_loads_neither_torch_nor_flwr() -> None:
    code = "import sys, protocols; print(sorted(m for m in ('torch', 'flwr') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
