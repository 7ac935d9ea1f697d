"""`pip install ./clients` in a fresh environment: light, and enough to answer a study.

A hospital that only calls the endpoint gets the `abdoserve-client` distribution:
grpcio, protobuf, numpy and tritonclient's protocol messages, never the server's
torch, ONNX Runtime, Triton wheel, DICOM decoders, locust or matplotlib, and no
generic top-level import names.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from abdoserve.export.phantom import build_study, write_study
from abdoserve_client import AbdoServeClient

CLIENT_SOURCE = Path(__file__).resolve().parents[2] / "clients"
HEAVY_DISTRIBUTIONS = {
    "torch",
    "onnx",
    "onnxruntime",
    "nvidia-pytriton",
    "pydicom",
    "pylibjpeg",
    "locust",
    "matplotlib",
    "abdoserve",
}
FORBIDDEN_IMPORT_NAMES = (
    "torch",
    "onnxruntime",
    "pytriton",
    "pydicom",
    "locust",
    "matplotlib",
    "abdoserve",
    "clients",
    "export",
    "deploy",
    "preprocessing",
    "loadtests",
)


@pytest.fixture(scope="module")
def client_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment with nothing but `pip install ./clients`."""
    root = tmp_path_factory.mktemp("client-env")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(CLIENT_SOURCE)],
        check=True,
        cwd=root,
    )
    return root


def run_in(env: Path, *args: str) -> str:
    """Run a command of the client environment from outside the repository."""
    result = subprocess.run(
        [str(env / "venv" / "bin" / args[0]), *args[1:]],
        check=True,
        cwd=env,
        capture_output=True,
        text=True,
    )
    return result.stdout


def test_the_client_environment_holds_none_of_the_server_packages(client_env: Path) -> None:
    listed = json.loads(run_in(client_env, "python", "-m", "pip", "list", "--format=json"))
    names = {item["name"].lower().replace("_", "-") for item in listed}
    assert "abdoserve-client" in names
    assert {"grpcio", "protobuf", "numpy"} <= names
    assert not names & HEAVY_DISTRIBUTIONS
    probe = (
        "import importlib.util, json; "
        f"print(json.dumps([n for n in {FORBIDDEN_IMPORT_NAMES!r} "
        "if importlib.util.find_spec(n)]))"
    )
    assert json.loads(run_in(client_env, "python", "-c", probe)) == []


def test_the_client_environment_answers_a_phantom_study(
    client_env: Path, grpc_url: str, tmp_path: Path
) -> None:
    study = build_study("bone_density_ct", seed=3)
    write_study(study, tmp_path / "study")
    files = sorted(str(path) for path in (tmp_path / "study").glob("*.dcm"))
    printed = run_in(
        client_env,
        "abdoserve-client",
        "infer",
        "bone_density_ct",
        *files,
        "--url",
        grpc_url,
        "--json",
    )
    answered = json.loads(printed)
    with AbdoServeClient(grpc_url, timeout_s=60) as client:
        reference = client.bone_density_ct(study.instances)
    assert answered["answer"]["task"] == "bone_density_ct"
    np.testing.assert_allclose(answered["study_values"], reference.study_values, rtol=1e-6)
    assert np.isfinite(answered["study_values"]).all()
    assert answered["answer"]["notice"] == reference.notice


def test_the_python_api_works_in_the_client_environment(
    client_env: Path, grpc_url: str, tmp_path: Path
) -> None:
    study = build_study("liver_fibrosis_ct", seed=4)
    write_study(study, tmp_path / "study")
    code = (
        "import json, pathlib; from abdoserve_client import AbdoServeClient\n"
        f"files = sorted(pathlib.Path({str(tmp_path / 'study')!r}).glob('*.dcm'))\n"
        f"with AbdoServeClient({grpc_url!r}, timeout_s=60) as client:\n"
        "    result = client.liver_fibrosis_ct(files, age=61, sex='F')\n"
        "print(json.dumps({'value': result.value, 'untrained': result.untrained}))\n"
    )
    answered = json.loads(run_in(client_env, "python", "-c", code))
    with AbdoServeClient(grpc_url, timeout_s=60) as client:
        reference = client.liver_fibrosis_ct(study.instances, age=61, sex="F")
    assert answered["value"] == pytest.approx(reference.value, rel=1e-6)
    assert answered["untrained"] is True
