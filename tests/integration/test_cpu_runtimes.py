"""Each CPU runtime served by a real tritonserver: its answers over real gRPC equal its
own runner in process, and every answer names the runtime (an INT8 one, its deviation).

One server holds all four runtimes: each is built, as `abdoserve build-repository
--cpu-runtime` builds it, for a task of its own, and the four tasks' model folders are
served from one repository (a build writes one runtime for all its tasks).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from abdoserve.deploy.embedded import EmbeddedServer, ServerOptions, free_ports
from abdoserve.export.calibration import CalibrationPlan
from abdoserve.export.configs import Tuning
from abdoserve.export.phantom import build_study
from abdoserve.preprocessing.study import StudyPreparer
from abdoserve.preprocessing.tasks import TASKS
from abdoserve.serving.answer import aggregate
from abdoserve.serving.cpu_runtimes import CPU_RUNTIMES, cpu_runtime, open_runner
from abdoserve_client import AbdoServeClient
from tests.integration.reference import RELATIVE_TOLERANCE, in_process_reference, relative_error

# runtime -> the task it serves here: with and without clinical features on each engine
SERVED = {
    "onnxruntime": "liver_fibrosis_ct",
    "onnxruntime-int8": "liver_mass_ct",
    "openvino": "liver_fibrosis_mri",
    "openvino-int8": "esophageal_cancer_ct",
}
TUNING = Tuning(preprocess_instances=1, net_instances=1)  # 12 stubs, not 20
PLAN = CalibrationPlan(calibration_studies=2, held_out_studies=2)  # tiny: tests, not figures
SEEDS = (7, 8)  # neither calibration nor held-out studies


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from abdoserve.export.repository import build_repository

    root = tmp_path_factory.mktemp("cpu-runtimes")
    served = root / "model_repository"
    served.mkdir()
    for runtime, task in SERVED.items():
        out = root / runtime
        build_repository(out, [task], tuning=TUNING, cpu_runtime=runtime, calibration=PLAN)
        shutil.copytree(out / task, served / task)  # `serve`'s default: one fused model
    return served


@pytest.fixture(scope="module")
def grpc_url(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_file = tmp_path_factory.mktemp("triton") / "triton.log"
    options = ServerOptions(repository=repository, ports=free_ports(), log_file=log_file)
    with EmbeddedServer(options) as server:
        yield f"{options.host}:{server.ports.grpc}"


def own_runner_output(
    repository: Path, runtime: str, task: str, study_seed: int
) -> tuple[np.ndarray, tuple[bytes, ...], dict[str, object]]:
    """The study through the served preprocessing and the runtime's runner, in process."""
    spec = TASKS[task]
    study = build_study(task, seed=study_seed)
    prepared = StudyPreparer(spec)(study.instances, study.clinical)
    runner = open_runner(
        cpu_runtime(runtime),
        repository / task / "1",  # the fused model's version 1 holds the net's files
        intra_op_threads=TUNING.net_intra_op_threads,
        max_samples=TUNING.max_samples_per_run,
    )
    features = [prepared.features] if spec.feature_width else None
    output = runner.run_studies([prepared.samples], features)[0]
    return output, study.instances, study.clinical


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("runtime", "task"), SERVED.items())
def test_served_answers_equal_the_runtimes_own_runner(
    repository: Path, grpc_url: str, runtime: str, task: str, seed: int
) -> None:
    expected, instances, clinical = own_runner_output(repository, runtime, task, seed)
    with AbdoServeClient(grpc_url, timeout_s=60) as client:
        result = client.infer(task, instances, clinical)
    np.testing.assert_allclose(result.image_values, expected, rtol=0, atol=1e-5)
    study = aggregate(TASKS[task].output, expected)
    np.testing.assert_allclose(result.study_values, study, rtol=0, atol=1e-5)
    if CPU_RUNTIMES[runtime].precision == "fp32":  # and so within 1e-4 of PyTorch
        reference = in_process_reference(task, instances, clinical)
        assert relative_error(result.image_values, reference) <= RELATIVE_TOLERANCE


@pytest.mark.parametrize(("runtime", "task"), SERVED.items())
def test_every_answer_names_its_runtime_and_int8_its_deviation(
    grpc_url: str, runtime: str, task: str
) -> None:
    study = build_study(task, seed=SEEDS[0])
    with AbdoServeClient(grpc_url, timeout_s=60) as client:
        result = client.infer(task, study.instances, study.clinical)
    named = result.answer["model"]["runtime"]
    assert named["name"] == runtime
    assert named["precision"] == CPU_RUNTIMES[runtime].precision
    # the client's typed result reads the same
    assert (result.model.runtime, result.model.precision) == (runtime, named["precision"])
    assert result.model.deviation == named.get("deviation")
    if CPU_RUNTIMES[runtime].is_default:
        assert "deviation" not in named  # held to PyTorch by the export's parity check
        return
    deviation = named["deviation"]  # measured at build time, carried as built
    assert deviation["reference"] == "PyTorch FP32"
    assert deviation["held_out_seeds"] == list(PLAN.held_out_seeds())
    assert 0.0 <= deviation["mean_abs"] <= deviation["max_abs"]
    assert 0.0 <= deviation["study_agreement"] <= 1.0
    assert "untrained" in deviation["caveat"]
    if CPU_RUNTIMES[runtime].precision == "fp32":
        assert deviation["max_abs"] <= 1e-4
