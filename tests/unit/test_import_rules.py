"""docs/architecture.md's may-import table is the import-linter contracts, rendered.

`lint-imports` (in `make check`) enforces the contracts in pyproject.toml; this test
keeps the table a reader sees equal to them. When it fails, paste the block it prints
between the two markers in docs/architecture.md.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- import-rules: begin -->", "<!-- import-rules: end -->"


def contracts() -> list[dict[str, Any]]:
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    found: list[dict[str, Any]] = settings["contracts"]
    return found


def short(module: str) -> str:
    return f"`{module.removeprefix('abdoserve.')}`"


def layer_rows(layers: list[str]) -> list[str]:
    """One row per layer: what it may import is every layer below it."""
    rows = []
    for position, layer in enumerate(layers):
        below = [name.strip() for lower in layers[position + 1 :] for name in lower.split("|")]
        siblings = [name.strip() for name in layer.split("|")]
        for name in siblings:
            others = [short(other) for other in siblings if other != name]
            allowed = ", ".join(short(module) for module in below) or "none of the others"
            note = f" (not {', '.join(others)})" if others else ""
            rows.append(f"| {short(name)} | {allowed}{note} |")
    return rows


def rendered_table() -> str:
    lines = [BEGIN, "", "| package | may import, of the project's packages |", "|---|---|"]
    forbidden = ["", "| contract | these | never import, even through another module |"]
    forbidden.append("|---|---|---|")
    for contract in contracts():
        if contract["type"] == "layers":
            lines.extend(layer_rows(contract["layers"]))
        elif contract["type"] == "forbidden":
            sources = ", ".join(short(module) for module in contract["source_modules"])
            never = ", ".join(short(module) for module in contract["forbidden_modules"])
            forbidden.append(f"| {contract['name']} | {sources} | {never} |")
    return "\n".join([*lines, *forbidden, "", END])


def documented_table() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[start:end]


def test_the_architecture_table_is_the_contracts() -> None:
    expected = rendered_table()
    assert documented_table() == expected, f"docs/architecture.md should hold:\n{expected}"


def test_every_contract_is_one_the_table_can_show() -> None:
    kinds = {contract["type"] for contract in contracts()}
    assert kinds <= {"layers", "forbidden"}
    assert {contract["id"] for contract in contracts()} >= {"layers", "client", "preprocessing"}
