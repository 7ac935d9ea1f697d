"""The prepared GPU check (loadtests/bench/gpu_check.py), end to end in its --dry mode.

The script is run as on a GPU machine where the project is not installed: a fresh
interpreter, no PYTHONPATH, the current directory elsewhere. It must find the
`abdoserve.*` packages in the checkout by itself, and say so in its JSON.
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
from abdoserve.export.onnx_export import OPSET
from abdoserve.loadtests.bench import gpu_check
from abdoserve.preprocessing.tasks import TASKS

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "loadtests" / "bench" / "gpu_check.py"
DRY_BATCHES = (1, 2)

Result = tuple[subprocess.CompletedProcess[str], dict[str, Any]]


def run_dry(folder: Path, *options: str, prefix: tuple[str, ...] = ()) -> Result:
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
    return run_dry(tmp_path_factory.mktemp("gpu_check"), prefix=(str(SCRIPT),))


def rows(record: dict[str, Any], section: str) -> list[dict[str, Any]]:
    return [row for row in record["rows"] if row["section"] == section]


def measured_or_skipped(row: dict[str, Any]) -> bool:
    if row["result"].startswith("skipped: ") and len(row["result"]) > len("skipped: "):
        return True
    return row["result"] == "ok" and row["rate"] > 0 and row["p50_ms"] > 0


def test_runs_from_a_plain_checkout_and_records_the_machine(dry_run: Result) -> None:
    _, record = dry_run
    assert record["abdoserve"].startswith(f"checkout {REPO}")  # not the installed package
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
    assert tensorrt[0]["mode"] == "onnx export" and tensorrt[0]["result"].startswith("ok")
    assert all(r["result"].startswith("skipped: ") for r in tensorrt[1:])
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


def test_with_torch_and_numpy_only_the_networks_still_run(tmp_path: Path) -> None:
    # as on a GPU machine with torch and numpy only: pydicom and onnx cannot be imported
    hide = (
        "import runpy, sys; sys.modules.update(pydicom=None, onnx=None); "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    _, record = run_dry(
        tmp_path,
        "--tasks",
        "liver_fibrosis_mri",
        "--batch-sizes",
        "1",
        "--url",
        "127.0.0.1:1",  # never reached: the phantom studies need pydicom first
        prefix=("-c", hide, str(SCRIPT)),
    )
    assert record["pydicom"] is None
    preprocess = {r["result"] for r in rows(record, "preprocess")}
    assert preprocess == {"skipped: pydicom not installed"}
    [fp32] = [r for r in rows(record, "pytorch") if r["mode"] == "fp32 eager"]
    assert fp32["result"] == "ok" and fp32["task"] == "liver_fibrosis_mri"
    assert "pydicom not installed" in rows(record, "served")[0]["result"]
    export = rows(record, "tensorrt")[0]
    assert export["mode"] == "onnx export"
    assert export["result"] == "skipped: onnx not installed (torch.onnx.export needs it)"
    assert record["exit_status"] == 0


def test_past_the_budget_every_row_says_so(tmp_path: Path) -> None:
    completed, record = run_dry(
        tmp_path, "--tasks", "bone_density_ct", "--budget-s", "0", prefix=(str(SCRIPT),)
    )
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


def test_the_export_contract_is_the_projects() -> None:
    assert gpu_check.ONNX_OPSET == OPSET


def test_abdoserve_bench_gpu_is_the_script() -> None:
    words = ["bench", "gpu", "--dry", "--budget-s", "60"]
    args = build_parser(words).parse_args(words)
    assert args.run is gpu_check.run
    assert args.dry and args.budget_s == 60 and args.batch_sizes == (1, 8, 32)
