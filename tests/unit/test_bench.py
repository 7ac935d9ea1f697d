"""The preprocessing benchmark and the phantom command, run small (no timing assertions)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from abdoserve.deploy.cli import main
from abdoserve.loadtests.bench.preprocess import (
    SYNTAXES,
    SyntaxResult,
    format_table,
    measure_syntax,
)


@pytest.fixture
def keep_affinity() -> Iterator[None]:
    """`bench` pins the process to one core; give the others back afterwards."""
    cores = os.sched_getaffinity(0)
    yield
    os.sched_setaffinity(0, cores)


def test_measure_syntax_reports_positive_rates() -> None:
    result = measure_syntax("ExplicitVRLittleEndian", slices=2, rounds=1)
    assert isinstance(result, SyntaxResult)
    assert result.transfer_syntax == "ExplicitVRLittleEndian" and result.slices == 2
    assert result.bare_slices_per_second > 0 and result.ours_slices_per_second > 0
    expected = result.bare_slices_per_second / result.ours_slices_per_second
    assert result.ratio == pytest.approx(expected, rel=1e-9)
    assert result.meets_target is (result.ratio <= 1.25)


def test_format_table_has_a_row_per_syntax() -> None:
    results = [
        SyntaxResult("ExplicitVRLittleEndian", 12, 1800.0, 1600.0, 1.125),
        SyntaxResult("JPEG2000Lossless", 12, 40.0, 30.0, 1.3333),
    ]
    lines = format_table(results).splitlines()
    assert len(lines) == 3 and "target <= 1.25" in lines[0]
    assert lines[1].split() == ["ExplicitVRLittleEndian", "12", "1800", "1600", "1.12", "met"]
    assert lines[2].split() == ["JPEG2000Lossless", "12", "40", "30", "1.33", "MISSED"]


@pytest.mark.usefixtures("keep_affinity")
def test_bench_command_writes_json_for_both_syntaxes(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "preprocess", "--slices", "2", "--rounds", "1", "--json", str(out)]
    assert main(argv) == 0
    entries = json.loads(out.read_text())
    assert [entry["transfer_syntax"] for entry in entries] == list(SYNTAXES)
    for entry in entries:
        assert entry["slices"] == 2 and entry["ours_slices_per_second"] > 0
        assert entry["ratio"] > 0


def test_phantom_command_writes_files_and_request(tmp_path: Path) -> None:
    out = tmp_path / "mass"
    assert main(["phantom", "liver_mass_ct", "--out", str(out), "--seed", "4"]) == 0
    names = sorted(path.name for path in out.iterdir())
    assert names == ["0001.dcm", "0002.dcm", "0003.dcm", "request.json", "truth.json"]
    request = json.loads((out / "request.json").read_text())
    assert set(request) == {"roi"} and len(request["roi"]) == 4
    truth = json.loads((out / "truth.json").read_text())
    assert truth["task"] == "liver_mass_ct" and len(truth["instances"]) == 3
    ds = pydicom.dcmread(out / "0001.dcm")
    assert ds.Modality == "CT" and (ds.Rows, ds.Columns) == (512, 512)


def test_phantom_command_honours_the_transfer_syntax(tmp_path: Path) -> None:
    out = tmp_path / "mri"
    argv = ["phantom", "liver_fibrosis_mri", "--out", str(out), "--transfer-syntax", "RLELossless"]
    assert main(argv) == 0
    ds = pydicom.dcmread(out / "0002.dcm")
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    assert set(json.loads((out / "request.json").read_text())) == {"field_strength", "hbv", "hcv"}
