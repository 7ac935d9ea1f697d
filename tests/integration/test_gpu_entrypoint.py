"""The containers' entrypoint (deploy/gpu/entrypoint.sh -> abdoserve.deploy.container), run
with the same Triton version (the wheel's binary): on an empty repository its arguments
are ones Triton 2.51 accepts, the admin APIs are closed without the key from the mounted
secret, and gRPC speaks mutual TLS; on a built repository the pod heals as the host
does: a killed stub turns the probes' /health/ready (port 8003) to 503, then its model
is reloaded, the probe is 200 again and a study is answered."""

from __future__ import annotations

import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from abdoserve.deploy import stubs
from abdoserve.deploy.embedded import PROJECT_ROOT, free_port, server_environment, triton_home
from abdoserve.deploy.model_control import ADMIN_HEADER, GRPC_HEADER_PREFIX
from abdoserve.export.phantom import build_study
from abdoserve_client import AbdoServeClient
from tests.pki import Pki, make_pki

ENTRYPOINT = PROJECT_ROOT / "deploy" / "gpu" / "entrypoint.sh"
KEY = "entrypoint-test-key"


def http_status(
    url: str, key: str | None = None, method: str = "POST", tls: ssl.SSLContext | None = None
) -> int:
    """The HTTP status, or 0 while nothing listens."""
    headers = {} if key is None else {ADMIN_HEADER: key}
    data = b"{}" if method == "POST" else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10, context=tls) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (urllib.error.URLError, OSError):
        return 0


def client_tls(pki: Pki) -> ssl.SSLContext:
    """What a hospital client presents to the guard (nginx serves TLS on every port)."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client.certificate), str(pki.client.key))
    return context


def wait_for(condition: Callable[[], bool], what: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 600  # all 20 models load and warm up
    while not condition():
        assert process.poll() is None, f"the entrypoint exited before {what}"
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


def container_env(folder: Path, repository: Path) -> dict[str, str]:
    (folder / "bin").mkdir()
    (folder / "bin" / "tritonserver").symlink_to(triton_home() / "bin" / "tritonserver")
    env = server_environment()  # this environment's bin/ first, as the image's PATH
    return env | {
        "PATH": f"{folder / 'bin'}{os.pathsep}{env['PATH']}",
        "MODEL_REPOSITORY": str(repository),
        "ABDOSERVE_LOG_DIR": str(folder / "logs"),
    }


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()  # the pod's SIGTERM: the supervisor stops Triton in order
    assert process.wait(timeout=120) == 0


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, Pki]]:
    folder = tmp_path_factory.mktemp("entrypoint")
    pki = make_pki(folder / "pki")
    (folder / "models").mkdir()
    secret = folder / "admin.key"
    secret.write_text(KEY + "\n")
    env = container_env(folder, folder / "models") | {
        "ABDOSERVE_ADMIN_KEY_FILE": str(secret),
        "ABDOSERVE_TLS_CERT": str(pki.server.certificate),
        "ABDOSERVE_TLS_KEY": str(pki.server.key),
        "ABDOSERVE_TLS_CLIENT_CA": str(pki.ca),
    }
    grpc, http = free_port(), free_port()
    ports = [f"--grpc-port={grpc}", f"--http-port={http}", f"--metrics-port={free_port()}"]
    ports.append(f"--supervisor-port={free_port()}")
    with (folder / "entrypoint.log").open("wb") as log:
        process = subprocess.Popen(
            ["sh", str(ENTRYPOINT), *ports, "--", "--allow-gpu-metrics=false"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            ready = f"https://localhost:{http}/v2/health/ready"
            tls = client_tls(pki)
            wait_for(lambda: http_status(ready, method="GET", tls=tls) == 200, "ready", process)
            yield grpc, http, pki
        finally:
            stop(process)


def test_the_admin_apis_need_the_key_from_the_secret(container: tuple[int, int, Pki]) -> None:
    _, http, pki = container
    tls = client_tls(pki)
    logging = f"https://localhost:{http}/v2/logging"
    assert http_status(logging, tls=tls) == 403
    assert http_status(logging, "guess", tls=tls) == 403
    assert http_status(logging, KEY, tls=tls) == 200
    assert http_status(f"https://localhost:{http}/v2/repository/index", tls=tls) == 403


def test_grpc_speaks_mutual_tls(container: tuple[int, int, Pki]) -> None:
    grpc, _, pki = container
    trusted = grpcclient.InferenceServerClient(
        f"localhost:{grpc}",
        ssl=True,
        root_certificates=str(pki.ca),
        private_key=str(pki.client.key),
        certificate_chain=str(pki.client.certificate),
    )
    assert trusted.is_server_live()
    with pytest.raises(InferenceServerException):
        trusted.get_log_settings()  # restricted without the key, over gRPC too
    assert trusted.get_log_settings(headers={GRPC_HEADER_PREFIX + ADMIN_HEADER: KEY})
    anonymous = grpcclient.InferenceServerClient(
        f"localhost:{grpc}", ssl=True, root_certificates=str(pki.ca)
    )
    with pytest.raises(InferenceServerException):
        anonymous.is_server_live()
    plaintext = grpcclient.InferenceServerClient(f"localhost:{grpc}")
    with pytest.raises(InferenceServerException):
        plaintext.is_server_live()


@pytest.fixture(scope="module")
def healing_pod(
    ensemble_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """The entrypoint on a built repository in the GPU image's shape (the ensemble),
    plain (the TLS case is above): (process, gRPC port, the supervisor's port that the
    Kubernetes probes read). The CPU shape heals in test_self_healing."""
    folder = tmp_path_factory.mktemp("pod")
    grpc, health = free_port(), free_port()
    ports = [f"--grpc-port={grpc}", f"--http-port={free_port()}"]
    ports += [f"--metrics-port={free_port()}", f"--supervisor-port={health}"]
    with (folder / "entrypoint.log").open("wb") as log:
        process = subprocess.Popen(
            ["sh", str(ENTRYPOINT), *ports],
            env=container_env(folder, ensemble_repository),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            probe = f"http://127.0.0.1:{health}/health/ready"
            wait_for(lambda: http_status(probe, method="GET") == 200, "ready", process)
            yield process, grpc, health
        finally:
            stop(process)


def triton_of(entrypoint: int) -> int:
    """The tritonserver the entrypoint's supervisor started (its child)."""
    children = [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and stubs.parent_of(int(entry.name)) == entrypoint
    ]
    servers = [pid for pid in children if b"tritonserver" in _cmdline(pid)]
    assert len(servers) == 1, children
    return servers[0]


def _cmdline(pid: int) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def test_a_killed_stub_fails_the_probe_then_the_pod_heals(
    healing_pod: tuple[subprocess.Popen[bytes], int, int],
) -> None:
    process, grpc, health = healing_pod
    probe = f"http://127.0.0.1:{health}/health/ready"
    server = triton_of(process.pid)
    preprocess = [s for s in stubs.stubs_of(server).values() if s.model.endswith("_preprocess")]
    victim = preprocess[0]
    # What the probe reads each time: 503 while the model is degraded, then 200 again.
    seen: list[int] = []

    def healed() -> bool:
        # The 503 lasts about the reload (~1 s): read the probe as fast as it answers.
        for _ in range(50):
            seen.append(http_status(probe, method="GET"))
            if 503 in seen and seen[-1] == 200:
                return True
        return False

    assert stubs.kill(victim.pid)
    wait_for(healed, f"{victim.model} reloaded", process)
    assert 503 in seen and seen[-1] == 200, seen[-20:]
    assert triton_of(process.pid) == server  # healed in place, not restarted
    task = victim.model.removesuffix("_preprocess")
    study = build_study(task, seed=3)
    with AbdoServeClient(f"127.0.0.1:{grpc}", timeout_s=60) as client:
        result = client.infer(task, study.instances, clinical=study.clinical)
    assert result.task == task
