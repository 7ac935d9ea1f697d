"""The CPU runtimes of the Python `_net`: each runner on held-out phantom tensors against
PyTorch (FP32 within 1e-4; INT8 deviation reported, never held to a bound), the shared
batching, and what a build records and refuses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from abdoserve.export.calibration import CalibrationPlan, StudyTensors, phantom_tensors
from abdoserve.export.deviation import (
    FP32_TOLERANCE,
    UNTRAINED_CAVEAT,
    DeviationReport,
    OutputDeviation,
    check_fp32,
    decision,
    decision_kind,
    measure_deviation,
)
from abdoserve.export.errors import ExportError, ParityError
from abdoserve.export.onnx_export import export_task
from abdoserve.export.reference import TorchReference
from abdoserve.export.runtime_models import head_nodes, write_runtime_model
from abdoserve.preprocessing.tasks import TASKS
from abdoserve.serving.cpu_runtimes import CPU_RUNTIMES, cpu_runtime, open_runner

# Small on purpose: the build's defaults are measured in docs/benchmarks.md.
PLAN = CalibrationPlan(calibration_studies=2, held_out_studies=3)
TASK_NAMES = ("liver_mass_ct", "liver_fibrosis_ct")  # no features / clinical features
RUNTIMES = tuple(CPU_RUNTIMES)
FP32 = [name for name in RUNTIMES if CPU_RUNTIMES[name].precision == "fp32"]
INT8 = [name for name in RUNTIMES if CPU_RUNTIMES[name].precision == "int8"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per task, a `_net` version folder holding every runtime's model file."""
    folders = {}
    for task in TASK_NAMES:
        folder = tmp_path_factory.mktemp(task)
        spec = TASKS[task]
        export_task(spec, folder)
        calibration = phantom_tensors(spec, PLAN.calibration_seeds())
        for runtime in CPU_RUNTIMES.values():
            write_runtime_model(runtime, folder, calibration)
        folders[task] = folder
    return folders


@pytest.fixture(scope="module")
def held_out() -> dict[str, list[StudyTensors]]:
    return {task: phantom_tensors(TASKS[task], PLAN.held_out_seeds()) for task in TASK_NAMES}


def deviation(task: str, runtime: str, folder: Path, held: list[StudyTensors]) -> DeviationReport:
    runner = open_runner(cpu_runtime(runtime), folder, intra_op_threads=2, max_samples=64)
    spec = TASKS[task]
    return measure_deviation(
        spec, cpu_runtime(runtime), runner, TorchReference(spec), held, untrained=True
    )


@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize("runtime", FP32)
def test_fp32_runtimes_are_within_1e_4_of_pytorch_on_held_out_studies(
    task: str, runtime: str, built: dict[str, Path], held_out: dict[str, list[StudyTensors]]
) -> None:
    report = deviation(task, runtime, built[task], held_out[task])
    assert report.max_abs <= FP32_TOLERANCE
    check_fp32(report)  # what the build runs: it passes
    assert report.study_agreement == 1.0 and report.image_agreement == 1.0


@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize("runtime", INT8)
def test_int8_deviation_is_measured_and_reported(
    task: str, runtime: str, built: dict[str, Path], held_out: dict[str, list[StudyTensors]]
) -> None:
    report = deviation(task, runtime, built[task], held_out[task])
    spec = TASKS[task]
    assert [item.output for item in report.outputs] == list(
        spec.output.labels if spec.output.kind == "classification" else spec.output.labels[:1]
    )
    for item in report.outputs:
        assert math.isfinite(item.max_abs) and math.isfinite(item.mean_abs)
        assert 0.0 <= item.mean_abs <= item.max_abs
        assert item.reference_min <= item.reference_max
    assert report.study_agreement is not None and 0.0 <= report.study_agreement <= 1.0
    assert report.image_agreement is not None and 0.0 <= report.image_agreement <= 1.0
    assert report.held_out_seeds == PLAN.held_out_seeds()
    assert report.images == sum(len(study.samples) for study in held_out[task])
    carried = report.to_json()
    assert carried["caveat"] == UNTRAINED_CAVEAT
    assert carried["agreement_of"] == decision_kind(spec.output)
    json.dumps(carried, allow_nan=False)  # finite: it travels in every answer


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_batch_of_studies_equals_each_study_alone(
    runtime: str, built: dict[str, Path], held_out: dict[str, list[StudyTensors]]
) -> None:
    """Every runner batches through StudyRunner: joined, chunked (here 2 rows), split."""
    task = "liver_fibrosis_ct"
    studies = held_out[task]
    runner = open_runner(cpu_runtime(runtime), built[task], intra_op_threads=1, max_samples=2)
    assert runner.with_features
    together = runner.run_studies(
        [study.samples for study in studies], [study.features for study in studies]
    )
    for study, output in zip(studies, together, strict=True):
        alone = runner.run_studies([study.samples], [study.features])[0]
        assert output.shape == (len(study.samples), 1)
        np.testing.assert_allclose(output, alone, atol=1e-5)


def test_openvino_honours_the_thread_count(built: dict[str, Path]) -> None:
    from abdoserve.serving.openvino_runner import OpenVinoRunner

    path = built["liver_mass_ct"] / CPU_RUNTIMES["openvino"].model_file
    runner = OpenVinoRunner(path, intra_op_threads=1, max_samples=8)
    assert runner.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert str(runner.compiled.get_property("PERFORMANCE_HINT")) == "LATENCY"
    assert not runner.with_features


def test_int8_files_keep_the_output_layer_in_fp32(built: dict[str, Path]) -> None:
    """Quantizing the output would clip answers to the calibration's range."""
    import onnx

    model = onnx.load(str(built["liver_fibrosis_ct"] / "model.int8.onnx"))
    producer = {output: node for node in model.graph.node for output in node.output}
    last = producer["output"]
    assert last.op_type not in ("QuantizeLinear", "DequantizeLinear")
    assert head_nodes(built["liver_fibrosis_ct"] / "model.onnx")[-1] == last.name
    assert any(node.op_type == "QuantizeLinear" for node in model.graph.node)


def test_an_fp32_runtime_beyond_the_bound_fails_the_build() -> None:
    def report(max_abs: float, precision: str) -> DeviationReport:
        output = OutputDeviation("F_DLCT", max_abs, max_abs / 2, 0.5, 3.0)
        return DeviationReport("openvino", precision, (2000,), 4, (output,), None, None, None, True)

    check_fp32(report(2.9e-4, "fp32"))  # the bound scales with the outputs' magnitude (3.0)
    with pytest.raises(ParityError, match="openvino: FP32 outputs differ"):
        check_fp32(report(3.1e-4, "fp32"))
    with pytest.raises(ParityError):
        check_fp32(report(float("nan"), "fp32"))
    check_fp32(report(0.5, "int8"))  # INT8 is reported, never held to a bound


@pytest.mark.parametrize(
    ("task", "values", "kind", "expected"),
    [
        ("liver_mass_ct", [0.1, 0.5, 0.2, 0.1, 0.1], "class", "B"),
        ("liver_fibrosis_ct", [2.7], "stage", "F3"),
        ("bone_density_ct", [0.65], "osteoporosis flag", True),
        ("esophageal_cancer_ct", [0.3], "suspicious flag", False),
    ],
)
def test_agreement_compares_the_answers_decision(
    task: str, values: list[float], kind: str, expected: object
) -> None:
    output = TASKS[task].output
    assert decision_kind(output) == kind
    assert decision(output, np.array(values, dtype=np.float32)) == expected


def test_calibration_and_held_out_seeds_are_disjoint() -> None:
    plan = CalibrationPlan()
    assert not set(plan.calibration_seeds()) & set(plan.held_out_seeds())
    assert 0 not in plan.calibration_seeds() + plan.held_out_seeds()  # the warm-up study
    with pytest.raises(ValueError):
        CalibrationPlan(calibration_studies=0)


def test_an_unknown_runtime_is_refused() -> None:
    with pytest.raises(ValueError, match="known: onnxruntime, onnxruntime-int8"):
        cpu_runtime("tflite")


@pytest.mark.parametrize("runtime", ["onnxruntime-int8", "openvino", "openvino-int8"])
def test_the_build_refuses_a_cpu_runtime_with_a_gpu_net(runtime: str, tmp_path: Path) -> None:
    from abdoserve.export.repository import build_repository

    with pytest.raises(ExportError, match="has none to choose"):
        build_repository(
            tmp_path / "r", ["liver_mass_ct"], net_runtime="tensorrt", cpu_runtime=runtime
        )
    assert not (tmp_path / "r").exists()


def test_the_command_line_refuses_int8_on_a_gpu_net(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from abdoserve.deploy.cli import main

    code = main(
        [
            "build-repository",
            "--out",
            str(tmp_path / "r"),
            "--task",
            "liver_mass_ct",
            "--net-runtime",
            "onnxruntime",
            "--cpu-runtime",
            "onnxruntime-int8",
        ]
    )
    assert code == 2
    assert "has none to choose" in capsys.readouterr().out


def test_build_json_and_is_built_tell_the_runtimes_apart(tmp_path: Path) -> None:
    from abdoserve.export.repository import build_repository, is_built

    out = tmp_path / "repository"
    build_repository(out, ["liver_mass_ct"], cpu_runtime="openvino-int8", calibration=PLAN)
    record = json.loads((out / "BUILD.json").read_text())
    assert record["cpu_runtime"] == "openvino-int8"
    runtime = record["liver_mass_ct"]["runtime"]
    assert runtime["name"] == "openvino-int8" and runtime["precision"] == "int8"
    assert runtime["calibration_seeds"] == list(PLAN.calibration_seeds())
    assert runtime["deviation"]["held_out_seeds"] == list(PLAN.held_out_seeds())
    assert is_built(out, ["liver_mass_ct"], cpu_runtime="openvino-int8")
    for other in ("onnxruntime", "onnxruntime-int8", "openvino"):
        assert not is_built(out, ["liver_mass_ct"], cpu_runtime=other)
    (out / "liver_mass_ct" / "1" / "model.int8.xml").unlink()  # fused: version 1 holds it
    assert not is_built(out, ["liver_mass_ct"], cpu_runtime="openvino-int8")


def test_the_runtime_reaches_the_configs_that_answer(tmp_path: Path) -> None:
    from abdoserve.export.repository import build_repository

    out = tmp_path / "repository"
    build_repository(out, ["liver_mass_ct"], cpu_runtime="onnxruntime-int8", calibration=PLAN)
    config = (out / "liver_mass_ct" / "config.pbtxt").read_text()  # the fused model's
    assert 'string_value: "onnxruntime-int8"' in config and "runtime_deviation" in config
    ensemble = tmp_path / "ensemble"
    build_repository(
        ensemble,
        ["liver_mass_ct"],
        cpu_runtime="onnxruntime-int8",
        calibration=PLAN,
        pipeline="ensemble",
    )
    for model in ("liver_mass_ct_net", "liver_mass_ct_postprocess", "liver_mass_ct"):
        config = (ensemble / model / "config.pbtxt").read_text()
        assert 'string_value: "onnxruntime-int8"' in config, model
        assert "runtime_deviation" in config, model
    default = tmp_path / "default"
    build_repository(default, ["liver_mass_ct"])
    config = (default / "liver_mass_ct" / "config.pbtxt").read_text()
    assert 'string_value: "onnxruntime"' in config and "runtime_deviation" not in config
    assert json.loads((default / "BUILD.json").read_text())["cpu_runtime"] == "onnxruntime"


def test_serve_passes_the_runtime_through_and_gives_it_a_folder_of_its_own() -> None:
    import argparse

    from abdoserve.deploy import serve
    from abdoserve.export.configs import Tuning

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    assert parser.parse_args([]).cpu_runtime == "onnxruntime"
    assert parser.parse_args(["--cpu-runtime", "openvino-int8"]).cpu_runtime == "openvino-int8"
    assert serve.default_repository(Tuning(), "onnxruntime", "fused") == serve.DEFAULT_REPOSITORY
    openvino = serve.default_repository(Tuning(), "openvino", "fused")
    assert openvino.name == "model_repository-openvino"
    ensemble = serve.default_repository(Tuning(), "openvino", "ensemble")
    assert ensemble.name == "model_repository-openvino-ensemble"
    tuned = serve.default_repository(Tuning(net_instances=1), "onnxruntime-int8", "fused").name
    assert tuned.startswith("model_repository-pre2-net1") and tuned.endswith("-onnxruntime-int8")
