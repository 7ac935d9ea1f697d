"""clients/examples/kserve_http.py (standard library only) against the real Triton server:
plain KServe v2 HTTP with the binary-data extension, DICOM alone where a task allows it,
answers equal to the typed gRPC client's."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from abdoserve.deploy.embedded import EmbeddedServer
from abdoserve.export.phantom import build_study
from abdoserve_client.client import AbdoServeClient
from abdoserve_client.results import ScoreResult

EXAMPLE = Path(__file__).resolve().parents[2] / "clients" / "examples" / "kserve_http.py"
SEED = 1


@pytest.fixture(scope="module")
def example() -> ModuleType:
    """The example loaded by path: it is a script, not part of any package."""
    spec = importlib.util.spec_from_file_location("kserve_http_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def http_url(server: EmbeddedServer) -> str:
    return f"http://{server.options.host}:{server.ports.http}"


@pytest.fixture(scope="module")
def client(grpc_url: str) -> Iterator[AbdoServeClient]:
    with AbdoServeClient(grpc_url, timeout_s=60.0) as opened:
        yield opened


DICOM_ONLY_TASKS = [("bone_density_ct", "BMD"), ("esophageal_cancer_ct", "esophageal_cancer")]


@pytest.mark.parametrize(("task", "value_key"), DICOM_ONLY_TASKS)
def test_dicom_alone_answers_as_the_grpc_client_does(
    example: ModuleType, http_url: str, client: AbdoServeClient, task: str, value_key: str
) -> None:
    study = build_study(task, seed=SEED)
    outputs = example.infer(http_url, task, study.instances, timeout=60)
    assert set(outputs) == {"ANSWER", "STUDY"}
    answer = example.answer_json(outputs)
    value = answer["result"][value_key]
    assert isinstance(value, float) and math.isfinite(value)

    typed = getattr(client, task)(study.instances)  # the typed client sends CLINICAL {}
    assert isinstance(typed, ScoreResult)
    # ANSWER rounds to 6 decimals; STUDY carries the full float32
    assert value == pytest.approx(typed.value, rel=1e-5, abs=1e-6)
    study_values = example.float32_values(outputs["STUDY"])
    assert study_values == pytest.approx(typed.study_values.tolist(), rel=1e-6)
    assert answer["task"] == task and answer["model"] == typed.answer["model"]
    assert answer["notice"] == typed.notice
    assert len(answer["images"]) == len(typed.images) == len(study.instances)


def test_dicom_alone_refused_where_clinical_inputs_are_needed(
    example: ModuleType, http_url: str
) -> None:
    study = build_study("liver_fibrosis_ct", seed=SEED)
    with pytest.raises(urllib.error.HTTPError) as raised:
        example.infer(http_url, "liver_fibrosis_ct", study.instances, timeout=60)
    assert raised.value.code == 400
    message = example.server_error(raised.value)["error"]
    assert "'CLINICAL'" in message and "missing" in message


def test_main_exits_2_with_the_servers_error_on_400(
    example: ModuleType, http_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = build_study("liver_fibrosis_ct", seed=SEED)
    files = write_instances(study.instances, tmp_path)
    code = example.main(["--url", http_url, "liver_fibrosis_ct", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert "'CLINICAL'" in json.loads(captured.err)["error"]
    clinical = json.dumps(dict(study.clinical))
    argv = ["--url", http_url, "liver_fibrosis_ct", *map(str, files), "--clinical", clinical]
    assert example.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["result"]["stage"].startswith("F")


def test_example_script_prints_the_answer(http_url: str, tmp_path: Path) -> None:
    study = build_study("bone_density_ct", seed=SEED)
    files = write_instances(study.instances, tmp_path)
    command = [sys.executable, str(EXAMPLE), "--url", http_url, "bone_density_ct", *files]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["task"] == "bone_density_ct"
    assert math.isfinite(answer["result"]["BMD"])
    assert answer["model"]["weights_source"] == "reference-untrained"


def write_instances(instances: tuple[bytes, ...], folder: Path) -> list[str]:
    paths = []
    for index, data in enumerate(instances):
        path = folder / f"{index:04d}.dcm"
        path.write_bytes(data)
        paths.append(str(path))
    return paths
