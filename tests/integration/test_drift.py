"""Drift through `abdoserve serve` as an operator runs it (issue 20, item 4): version 1 is
validated on a labelled phantom cohort, which becomes its drift baseline; the same
studies sent again keep every index low; the same studies from a scanner set to 80 kV
by another vendor move the kVp and vendor indices past 0.25 on the supervisor's
/metrics, and the AbdoServeDrift alert goes pending in a real Prometheus, while the
answers' index stays low. No header text reaches a label or a log."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from abdoserve.deploy.embedded import free_port
from abdoserve.deploy.prometheus_server import PrometheusServer
from abdoserve.export.phantom.cohort import write_cohort
from abdoserve.serving.drift_bins import REFERENCE_FILE
from abdoserve.serving.task_models import on_disk
from abdoserve_client import AbdoServeClient
from abdoserve_client.instances import folder_files, folder_request, load_instances
from tests.integration.serve_process import (
    ABDOSERVE,
    free_ports,
    small_serve,
    start_serve,
    stop_serve,
)
from tests.integration.test_versions_replicas import wait_until

TASK = "bone_density_ct"
COHORT = 16
PATIENT_NAME = "Drift^Patricia"
VENDOR_TEXT = "SIEMENS Healthineers AG"


@dataclass
class Served:
    ports: dict[str, int]
    home: Path
    log: Path
    output: list[str]

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def supervisor_index(self) -> dict[str, float]:
        """The supervisor's drift index of version 1, by feature."""
        url = f"http://127.0.0.1:{self.ports['health']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        return {
            sample.labels["feature"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "abdoserve_supervisor_drift_index"
            and sample.labels["task"] == TASK
            and sample.labels["version"] == "1"
        }

    def triton_metrics(self) -> str:
        url = f"http://127.0.0.1:{self.ports['metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return str(reply.read().decode())


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from abdoserve.export.repository import build_repository

    out = tmp_path_factory.mktemp("drift") / "model_repository"
    build_repository(out, [TASK])
    return out


@pytest.fixture(scope="module")
def served(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("serve")
    home = tmp_path_factory.mktemp("operator")
    ports = free_ports()
    arguments = [
        *small_serve(repository, ports, folder),
        "--drift-window-s=900",
        f"--drift-min-studies={COHORT}",
        "--drift-every-s=1",
    ]
    environment = {**os.environ, "HOME": str(home)}
    environment.pop("ABDOSERVE_ADMIN_KEY", None)
    output: list[str] = []
    process = start_serve(arguments, output, wait_s=240.0, env=environment)
    yield Served(ports, home, folder / "triton.log", output)
    stop_serve(process, output)


def studies_of(cohort: Path) -> list[tuple[list[bytes], dict[str, object]]]:
    folders = sorted(path for path in cohort.iterdir() if path.is_dir())
    return [(load_instances(folder_files(f)), folder_request([f])) for f in folders]


def from_another_scanner(instances: list[bytes]) -> list[bytes]:
    """The same pixels, written as an 80 kV acquisition on another vendor's scanner."""
    changed = []
    for data in instances:
        dataset = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
        dataset.KVP = 80
        dataset.Manufacturer = VENDOR_TEXT
        dataset.PatientName = PATIENT_NAME
        out = pydicom.filebase.DicomBytesIO()
        dataset.save_as(out, enforce_file_format=True)
        changed.append(out.getvalue())
    return changed


def send(served: Served, studies: list[tuple[list[bytes], dict[str, object]]]) -> None:
    with AbdoServeClient(served.url, timeout_s=60) as client:
        for instances, clinical in studies:
            assert client.infer(TASK, instances, clinical).model.version == "1"


def test_a_validated_version_drifts_where_its_traffic_departs_from_its_cohort(
    served: Served, repository: Path, tmp_path: Path
) -> None:
    cohort = tmp_path / "cohort"
    write_cohort(TASK, COHORT, cohort, seed=11)
    lenient = tmp_path / "thresholds.json"
    lenient.write_text(json.dumps({TASK: {"mae": {"max": 100.0}}}))
    done = subprocess.run(
        [
            ABDOSERVE, "model", "validate", TASK, "1",
            "--studies", str(cohort), "--labels", str(cohort / "labels.csv"),
            "--out", str(tmp_path / "report"), "--thresholds", str(lenient),
            "--repository", str(repository), "--url", served.url,
        ],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "HOME": str(served.home)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    models = on_disk(repository, TASK)
    assert models is not None and models.fused  # `serve`'s default shape
    baseline = json.loads((repository / models.versions / "1" / REFERENCE_FILE).read_text())
    kvp = baseline["features"]["kvp"]
    assert baseline["studies"] == COHORT and kvp["counts"][kvp["edges"].index(120.0)] == COHORT
    assert "drift baseline" in done.stdout

    studies = studies_of(cohort)
    send(served, studies)  # the cohort again: the window holds it twice, in the same shares
    wait_until(lambda: len(served.supervisor_index()) == 6, "an index for every feature")
    alike = served.supervisor_index()
    assert max(alike.values()) == pytest.approx(0.0, abs=1e-9), alike

    supervisor = f"127.0.0.1:{served.ports['health']}"
    with PrometheusServer(
        [f"127.0.0.1:{served.ports['metrics']}"],
        port=free_port(),
        data_dir=tmp_path / "prometheus",
        interval_s=1,
        supervisor_targets=[supervisor],
    ) as prometheus:
        send(served, [(from_another_scanner(i), clinical) for i, clinical in studies])
        wait_until(lambda: served.supervisor_index()["kvp"] > 0.25, "the kVp index to rise")
        shifted = served.supervisor_index()
        assert shifted["manufacturer"] > 0.25, shifted
        unchanged = ("answer", "body_hu", "pixel_spacing_mm", "slice_thickness_mm")
        assert max(shifted[name] for name in unchanged) == pytest.approx(0.0, abs=1e-9)
        alerts = 'ALERTS{alertname="AbdoServeDrift"}'
        wait_until(lambda: prometheus.query(alerts) != [], "the drift alert in Prometheus")
        features = {sample.labels["feature"] for sample in prometheus.query(alerts)}
        assert {"kvp", "manufacturer"} <= features and "answer" not in features

    metrics = served.triton_metrics()
    assert 'manufacturer="siemens"' in metrics and 'manufacturer="other"' in metrics
    for text in (metrics, served.log.read_text(), "".join(served.output)):
        assert PATIENT_NAME not in text and VENDOR_TEXT not in text
