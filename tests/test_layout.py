"""The import rules of the layout (docs/layout.md): each area imports only what it may.

Every import counts, also one inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"contracts", "client", "server", "privacy", "simulations", "deploy", "fedslm"}
ALLOWED = {  # area -> project areas it may import (besides itself)
    "contracts": set(),
    "privacy": {"contracts"},
    "client": {"contracts", "privacy"},
    "server": {"contracts", "privacy"},
    "deploy": {"contracts"},
}
THIRD_PARTY_IN_CONTRACTS = {"numpy", "safetensors"}  # safetensors: only to read/write files
FLOWER_IN_CONTRACTS = {"transport.py"}  # Flower's record types, for adapters in messages


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("area", sorted(ALLOWED))
def test_area_imports_only_what_it_may(area):
    for path in sorted((ROOT / area).rglob("*.py")):
        used = imports(path) & PROJECT - {area}
        assert used <= ALLOWED[area], f"{path.relative_to(ROOT)} imports {used - ALLOWED[area]}"


def test_contracts_need_only_numpy_and_the_standard_library():
    import sys

    for path in sorted((ROOT / "contracts").rglob("*.py")):
        outside = {m for m in imports(path) - {"contracts", "__future__"}
                   if m not in sys.stdlib_module_names}
        allowed = THIRD_PARTY_IN_CONTRACTS | ({"flwr"} if path.name in FLOWER_IN_CONTRACTS
                                              else set())
        assert outside <= allowed, f"{path.name} imports {outside}"


def test_the_rule_finds_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from client.model import load_base\n")
    assert imports(bad) & PROJECT == {"client"}
