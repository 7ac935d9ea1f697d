"""`abdoserve bench runtimes` in its shortest form: every runner reported, side by side."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from abdoserve.deploy.cli import main
from abdoserve.serving.cpu_runtimes import CPU_RUNTIMES


def test_bench_runtimes_reports_every_runner_with_its_deviation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runtimes.json"
    arguments = ["bench", "runtimes", "--tasks", "liver_mass_ct", "--rounds", "1"]
    arguments += ["--calibration-studies", "1", "--held-out-studies", "1", "--json", str(out)]
    arguments += ["--openvino-settings"]
    assert main(arguments) == 0
    document = json.loads(out.read_text())
    assert document["machine"]["cores"] >= 1
    assert isinstance(document["machine"]["int8_dot_product"], list)
    assert document["settings"]["command"].startswith("abdoserve bench runtimes --tasks")
    task = document["tasks"]["liver_mass_ct"]
    rows = {row["runner"]: row for row in task["runners"]}
    variants = ["openvino pinned", "openvino 1 thread", "openvino throughput", "openvino defaults"]
    assert list(rows) == ["pytorch-eager", *CPU_RUNTIMES, *variants]
    assert all(rows[name]["deviation"] is None for name in variants)  # same file as openvino
    assert rows["onnxruntime"]["speedup_vs_onnxruntime"] == 1.0
    assert rows["pytorch-eager"]["speedup_vs_pytorch"] == 1.0
    assert rows["pytorch-eager"]["deviation"] is None
    for name, runtime in CPU_RUNTIMES.items():
        row = rows[name]
        assert row["study_p50_ms"] > 0 and row["images_per_s"] > 0
        assert row["batched_images_per_s"] > 0 and row["speedup_vs_pytorch"] > 0
        deviation = row["deviation"]
        assert math.isfinite(deviation["max_abs"]) and deviation["held_out_studies"] == 1
        if runtime.precision == "fp32":
            assert deviation["max_abs"] <= 1e-4
        else:  # reported, never held to a bound
            assert 0.0 <= deviation["study_agreement"] <= 1.0
    printed = capsys.readouterr().out
    assert "openvino-int8" in printed and "vs ORT" in printed
