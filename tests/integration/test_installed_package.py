"""A plain, non-editable `pip install .` builds a repository and serves a study.

Nothing of abdoserve may be found relative to a checkout: the wheels are installed
into a fresh environment and every command runs from an empty working directory, far
from this checkout. The environment's third-party dependencies come from the test
environment's site-packages (one path line in a .pth file), so the test fetches
nothing; what it proves is that abdoserve itself (its Triton entry points, configs and
the files it copies) works as an installed package.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from abdoserve.deploy.embedded import free_ports
from abdoserve.export.phantom import build_study, write_study
from tests.integration.reference import RELATIVE_TOLERANCE, in_process_reference, relative_error

CHECKOUT = Path(__file__).resolve().parents[2]
TASK = "bone_density_ct"
DEBIAN_PYTHON = "/usr/bin/python3.11"  # the Python-backend stub links its libpython
LOCAL_ONLY = (".git", ".venv", "build", "*.egg-info", "*_cache", "__pycache__", ".hypothesis")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment holding the two wheels built from this checkout."""
    root = tmp_path_factory.mktemp("installed")
    # A copy of the sources, so that the wheel build's own build/ stays out of the checkout.
    source = root / "source"
    shutil.copytree(CHECKOUT, source, ignore=shutil.ignore_patterns(*LOCAL_ONLY))
    wheels = root / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "-w", str(wheels), str(source / "clients"), str(source)],
        check=True,
    )  # fmt: skip
    venv = root / "venv"
    subprocess.run([DEBIAN_PYTHON, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-index", *map(str, sorted(wheels.glob("*.whl")))],
        check=True,
    )  # fmt: skip
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", where], check=True, capture_output=True, text=True
        ).stdout.strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv


def command(venv: Path, *words: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "abdoserve"), *words],
        cwd=cwd, capture_output=True, text=True, timeout=900, check=True,
        env={**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"},
    )  # fmt: skip


def test_abdoserve_is_imported_from_the_installed_wheel(installed: Path, tmp_path: Path) -> None:
    probe = (
        "import abdoserve.serving.python_models as m, abdoserve.export.locations as l;"
        "print(m.__file__); print(l.PYTHON_MODELS)"
    )
    done = subprocess.run(
        [str(installed / "bin" / "python"), "-c", probe],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    for line in done.stdout.split():
        assert Path(line).resolve().is_relative_to(installed), line
        assert not Path(line).resolve().is_relative_to(CHECKOUT), line
    assert {path.name for path in Path(done.stdout.split()[1]).glob("*.py")} >= {
        "preprocess.py", "net.py", "postprocess.py", "pipeline.py"
    }  # fmt: skip


@pytest.fixture(scope="module")
def served(installed: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`abdoserve build-repository` then `abdoserve serve`, from an empty folder."""
    work = tmp_path_factory.mktemp("work")
    command(installed, "build-repository", "--task", TASK, "--out", "repository", cwd=work)
    ports = free_ports()
    supervisor_port = free_ports().grpc
    server = subprocess.Popen(
        [str(installed / "bin" / "abdoserve"), "serve", "--repository", "repository",
         "--grpc-port", str(ports.grpc), "--http-port", str(ports.http),
         "--metrics-port", str(ports.metrics), "--supervisor-port", str(supervisor_port)],
        cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PATH": f"{installed / 'bin'}:{os.environ['PATH']}"},
    )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{supervisor_port}/health/ready", server)
        yield f"127.0.0.1:{ports.grpc}"
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


def wait_ready(url: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert server.poll() is None, f"abdoserve serve exited with {server.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise AssertionError(f"{url} was not ready in 600 s")


def test_the_installed_server_answers_a_study_as_pytorch_does(
    installed: Path, served: str, tmp_path: Path
) -> None:
    study = build_study(TASK, seed=7)
    write_study(study, tmp_path / "study")
    done = command(installed, "infer", TASK, "study", "--url", served, "--json", cwd=tmp_path)
    printed = json.loads(done.stdout)
    assert printed["answer"]["model"]["name"] == TASK
    assert printed["answer"]["model"]["weights_source"] == "reference-untrained"
    values = np.array(printed["image_values"], dtype=np.float32)
    reference = in_process_reference(TASK, study.instances, study.clinical)
    assert values.shape == reference.shape
    assert relative_error(values, reference) <= RELATIVE_TOLERANCE
