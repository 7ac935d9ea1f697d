"""The prepared GPU check (`abdoserve bench gpu`), end to end in its --dry mode.

It runs as on a GPU machine where abdoserve is installed: a fresh interpreter, no
PYTHONPATH, the current directory elsewhere; the ONNX graph and build_engine.sh come
from the repository build's own code (export/gpu_net.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from abdoserve.deploy.cli import build_parser
from abdoserve.export.configs import MAX_BATCH_SIZE
from abdoserve.export.onnx_export import OPSET
from abdoserve.loadtests.bench import gpu_check
from abdoserve.preprocessing.tasks import TASKS

COMMAND = ("-m", "abdoserve.deploy.cli", "bench", "gpu")
DRY_BATCHES = (1, 2)

Result = tuple[subprocess.CompletedProcess[str], dict[str, Any]]


def run_dry(folder: Path, *options: str, prefix: tuple[str, ...] = COMMAND) -> Result:
    out = folder / "g.json"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    command = [sys.executable, *prefix, "--dry", "--out", str(out), "--budget-s", "120"]
    completed = subprocess.run(
        [*command, *options],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed, json.loads(out.read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> Result:
    return run_dry(tmp_path_factory.mktemp("gpu_check"))


def rows(record: dict[str, Any], section: str) -> list[dict[str, Any]]:
    return [row for row in record["rows"] if row["section"] == section]


def measured_or_skipped(row: dict[str, Any]) -> bool:
    if row["result"].startswith("skipped: ") and len(row["result"]) > len("skipped: "):
        return True
    return row["result"] == "ok" and row["rate"] > 0 and row["p50_ms"] > 0


def test_runs_the_installed_package_and_records_the_machine(dry_run: Result) -> None:
    _, record = dry_run
    assert record["abdoserve"].startswith("installed package, ")
    assert record["pydicom"]
    assert record["gpu"] == "cpu (dry run)"
    assert record["dry_run"] is True
    assert record["date"][:2] == "20"
    assert record["torch"] and record["cores"] >= 1
    assert "cuda" in record
    assert record["exit_status"] == 0


def test_every_task_has_a_row_per_mode_and_batch(dry_run: Result) -> None:
    _, record = dry_run
    timed = rows(record, "pytorch")
    for task in TASKS:
        for mode in gpu_check.MODES:
            for batch in DRY_BATCHES:
                [row] = [
                    r for r in timed if (r["task"], r["mode"], r["batch"]) == (task, mode, batch)
                ]
                assert measured_or_skipped(row), row
        fp32 = [r for r in timed if r["task"] == task and r["mode"] == "fp32 eager"]
        assert all(r["result"] == "ok" for r in fp32)  # FP32 always runs
        graph = [r for r in timed if r["task"] == task and r["mode"] == "fp16 cuda graph"]
        assert all("CUDA graphs need a GPU" in r["result"] for r in graph)


def test_fp16_is_checked_against_fp32_for_every_task(dry_run: Result) -> None:
    _, record = dry_run
    checks = rows(record, "fp16 check")
    for task in TASKS:
        autocast = [r for r in checks if (r["task"], r["mode"]) == (task, "fp16 autocast")]
        assert len(autocast) == 1
        result = autocast[0]["result"]
        if result.startswith(("PASS", "FAIL")):
            difference = autocast[0]["values"]["max_abs_difference"]
            assert result.startswith("PASS") == (difference <= gpu_check.FP16_TOLERANCE)
        else:
            assert result.startswith("skipped: ")
        assert any(r["task"] == task and r["mode"] == "fp16 cuda graph" for r in checks)


def test_the_other_sections_measure_or_say_why_not(dry_run: Result) -> None:
    _, record = dry_run
    preprocess = rows(record, "preprocess")
    assert len(preprocess) == len({1, os.cpu_count()})
    for row in preprocess:
        assert row["result"].startswith("ok") and row["rate"] > 0
        assert row["values"]["images_per_s"] > 0
    tensorrt = rows(record, "tensorrt")
    export = tensorrt[0]
    assert export["mode"] == "onnx export" and export["result"].startswith("ok")
    assert f"opset {OPSET}" in export["result"]
    assert 0 <= export["values"]["relative_error"] <= 1e-4  # the build's own parity bound
    assert all(r["result"] == "skipped: no CUDA (dry run on CPU)" for r in tensorrt[1:])
    served = rows(record, "served")
    assert {r["task"] for r in served} == set(TASKS)
    assert all(r["result"] == "skipped: no --url given" for r in served)


def test_the_table_is_printed(dry_run: Result) -> None:
    completed, record = dry_run
    lines = completed.stdout.splitlines()
    assert lines[0].startswith("GPU check: cpu (dry run)")
    assert lines[1].split()[:4] == ["section", "task", "mode", "batch"]
    assert len(lines) == 2 + len(record["rows"]) + 1  # header, rows, "JSON written to"
    for task in TASKS:
        assert any(task in line and "fp32 eager" in line for line in lines)


def test_past_the_budget_every_row_says_so(tmp_path: Path) -> None:
    completed, record = run_dry(tmp_path, "--tasks", "bone_density_ct", "--budget-s", "0")
    results = {row["section"]: row["result"] for row in record["rows"]}
    assert set(results) == {"pytorch", "fp16 check", "preprocess", "tensorrt", "served"}
    for section, result in results.items():
        expected = "skipped: no --url given" if section == "served" else "skipped: time budget"
        assert result == expected, section
    assert all(row["result"].startswith("skipped: ") for row in record["rows"])
    assert "skipped: time budget" in completed.stdout


def test_without_cuda_and_without_dry_it_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gpu_check.main(["--out", str(tmp_path / "g.json")]) == 2
    assert "--dry" in capsys.readouterr().err
    assert not (tmp_path / "g.json").exists()


def test_batches_fold_into_studies_within_the_plans_profile() -> None:
    assert gpu_check.study_shape(1, 16) == (1, 1)
    assert gpu_check.study_shape(8, 16) == (MAX_BATCH_SIZE, 1)
    assert gpu_check.study_shape(32, 16) == (MAX_BATCH_SIZE, 4)  # 32 samples as 8 x 4
    assert gpu_check.study_shape(32, 1) is None  # images as channels: one sample a study
    assert not hasattr(gpu_check, "CheckoutFinder")  # one package mapping: the install's


def test_abdoserve_bench_gpu_is_the_script() -> None:
    words = ["bench", "gpu", "--dry", "--budget-s", "60"]
    args = build_parser(words).parse_args(words)
    assert args.run is gpu_check.run
    assert args.dry and args.budget_s == 60 and args.batch_sizes == (1, 8, 32)
