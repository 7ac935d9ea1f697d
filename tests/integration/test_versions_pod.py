"""Versions in the pod (issue 20, item 3): the containers' entrypoint on a repository that
holds an imported version 2, driven by `abdoserve model` with the admin key from the
mounted secret, as a remote operator (or `kubectl port-forward`) drives it. Canary,
promote and rollback change which version answers with no restart of Triton, the
repository keeps each change (the volume the next pod mounts), and the canary and
drift bounds given to the entrypoint are the supervisor's."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from abdoserve.deploy.embedded import free_port
from abdoserve.deploy.version_sync import routing_on_disk
from abdoserve.export.model_import import import_model
from abdoserve.export.phantom import build_study
from abdoserve.export.weights import reference_network
from abdoserve.preprocessing.tasks import get_task
from abdoserve_client import AbdoServeClient
from tests.integration.serve_process import ABDOSERVE
from tests.integration.test_gpu_entrypoint import (
    ENTRYPOINT,
    container_env,
    http_status,
    stop,
    triton_of,
    wait_for,
)

TASK = "bone_density_ct"
KEY = "pod-operator-key"
STUDIES = 24


@dataclass
class Pod:
    process: subprocess.Popen[bytes]
    grpc: int
    secret: Path
    repository: Path
    log: Path

    def model(self, *words: str) -> str:
        where = ["--url", f"127.0.0.1:{self.grpc}", "--admin-key-file", str(self.secret)]
        done = subprocess.run(
            [ABDOSERVE, "model", *words, *where],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def versions(self) -> dict[int, str]:
        """The version each phantom study's answer names."""
        with AbdoServeClient(f"127.0.0.1:{self.grpc}", timeout_s=60) as client:
            return {
                seed: client.infer(TASK, study.instances, study.clinical).model.version
                for seed in range(STUDIES)
                for study in [build_study(TASK, seed=seed)]
            }


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    from abdoserve.export.repository import build_repository

    folder = tmp_path_factory.mktemp("pod")
    repository = folder / "models"
    build_repository(repository, [TASK])  # the CPU pod's init container: fused
    network = reference_network(get_task(TASK)).module
    with torch.no_grad():
        [*_, last] = [layer for layer in network.modules() if isinstance(layer, torch.nn.Linear)]
        last.bias += 0.05
    torch.save(network.state_dict(), folder / "hospital.pt")
    assert import_model(repository, TASK, folder / "hospital.pt").version == 2
    secret = folder / "admin.key"
    secret.write_text(KEY + "\n")
    secret.chmod(0o600)  # the operator's copy: the commands refuse a key others can read
    grpc, health = free_port(), free_port()
    arguments = [f"--grpc-port={grpc}", f"--http-port={free_port()}"]
    arguments += [f"--metrics-port={free_port()}", f"--supervisor-port={health}"]
    arguments += ["--rollback-window-s=30", "--drift-window-s=600"]
    env = container_env(folder, repository) | {"ABDOSERVE_ADMIN_KEY_FILE": str(secret)}
    log = folder / "entrypoint.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            ["sh", str(ENTRYPOINT), *arguments], env=env, stdout=output, stderr=subprocess.STDOUT
        )
        try:
            probe = f"http://127.0.0.1:{health}/health/ready"
            wait_for(lambda: http_status(probe, method="GET") == 200, "ready", process)
            yield Pod(process, grpc, secret, repository, log)
        finally:
            stop(process)


def test_the_model_commands_drive_the_pod_with_the_key_from_its_secret(pod: Pod) -> None:
    server = triton_of(pod.process.pid)
    listed = pod.model("list", TASK).splitlines()
    assert listed[1].split()[:2] == ["1", "serving"] and listed[2].split()[:2] == ["2", "retired"]
    assert set(pod.versions().values()) == {"1"}

    pod.model("canary", TASK, "2", "--percent", "50")
    split = pod.versions()
    assert set(split.values()) == {"1", "2"}, split
    assert pod.versions() == split  # a study sent again keeps its version
    wait_for(
        lambda: routing_on_disk(pod.repository / TASK).mode == "canary",
        "the canary written into the volume's repository",
        pod.process,
    )

    pod.model("promote", TASK, "2", "--force", "--reason", "pod test: no cohort here")
    assert set(pod.versions().values()) == {"2"}
    pod.model("rollback", TASK)
    assert set(pod.versions().values()) == {"1"}
    wait_for(
        lambda: routing_on_disk(pod.repository / TASK).production == 1,
        "the rollback written into the volume's repository",
        pod.process,
    )
    assert triton_of(pod.process.pid) == server  # no restart: the same Triton throughout
