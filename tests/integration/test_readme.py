"""The README's quick start and ten-line client run as written (paths and URL substituted)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from abdoserve.deploy.cli import main as abdoserve_main
from abdoserve.export.phantom import build_study, write_study

README = Path(__file__).resolve().parents[2] / "README.md"


def python_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1, "the README holds one Python example"
    return str(blocks[0])


def test_readme_client_example_runs(
    grpc_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "fibrosis"
    write_study(build_study("liver_fibrosis_ct", seed=0), folder)
    code = python_snippet().replace("/tmp/fibrosis", str(folder))
    code = code.replace("127.0.0.1:8001", grpc_url)
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert "'stage': 'F" in printed[0]
    assert printed[1] == "reference-untrained"
    assert printed[2].startswith("UNTRAINED REFERENCE WEIGHTS")


def test_readme_quick_start_commands(
    grpc_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "fibrosis"
    assert abdoserve_main(["phantom", "liver_fibrosis_ct", "--out", str(folder)]) == 0
    assert abdoserve_main(["infer", "liver_fibrosis_ct", str(folder), "--url", grpc_url]) == 0
    output = capsys.readouterr().out
    assert "F_DLCT" in output
    assert "UNTRAINED REFERENCE WEIGHTS" in output
