"""The GPU container's entrypoint, run with the same Triton version (the wheel's binary)
on an empty repository: its arguments are ones Triton 2.51 accepts, the admin APIs
are closed without the key from the mounted secret, and gRPC speaks mutual TLS."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from abdoserve.deploy.embedded import PROJECT_ROOT, free_port, server_environment, triton_home
from abdoserve.deploy.model_control import ADMIN_HEADER, GRPC_HEADER_PREFIX
from tests.pki import Pki, make_pki

ENTRYPOINT = PROJECT_ROOT / "deploy" / "gpu" / "entrypoint.sh"
KEY = "entrypoint-test-key"


def http_status(url: str, key: str | None = None, method: str = "POST") -> int:
    """The HTTP status, or 0 while nothing listens."""
    headers = {} if key is None else {ADMIN_HEADER: key}
    data = b"{}" if method == "POST" else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (urllib.error.URLError, OSError):
        return 0


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, Pki]]:
    folder = tmp_path_factory.mktemp("entrypoint")
    pki = make_pki(folder / "pki")
    (folder / "models").mkdir()
    (folder / "bin").mkdir()
    (folder / "bin" / "tritonserver").symlink_to(triton_home() / "bin" / "tritonserver")
    secret = folder / "admin.key"
    secret.write_text(KEY + "\n")
    env = server_environment() | {
        "PATH": f"{folder / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "MODEL_REPOSITORY": str(folder / "models"),
        "ABDOSERVE_ADMIN_KEY_FILE": str(secret),
        "ABDOSERVE_TLS_CERT": str(pki.server.certificate),
        "ABDOSERVE_TLS_KEY": str(pki.server.key),
        "ABDOSERVE_TLS_CLIENT_CA": str(pki.ca),
    }
    grpc, http = free_port(), free_port()
    ports = [f"--grpc-port={grpc}", f"--http-port={http}", f"--metrics-port={free_port()}"]
    with (folder / "triton.log").open("wb") as log:
        process = subprocess.Popen(
            ["bash", str(ENTRYPOINT), "--allow-gpu-metrics=false", *ports],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            ready = f"http://127.0.0.1:{http}/v2/health/ready"
            while http_status(ready, method="GET") != 200:
                assert process.poll() is None, (folder / "triton.log").read_text()
                assert time.monotonic() < deadline, "the entrypoint's server never got ready"
                time.sleep(0.2)
            yield grpc, http, pki
        finally:
            process.terminate()
            process.wait(timeout=60)


def test_the_admin_apis_need_the_key_from_the_secret(container: tuple[int, int, Pki]) -> None:
    _, http, _ = container
    logging = f"http://127.0.0.1:{http}/v2/logging"
    assert http_status(logging) == 403
    assert http_status(logging, "guess") == 403
    assert http_status(logging, KEY) == 200
    assert http_status(f"http://127.0.0.1:{http}/v2/repository/index") == 403


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
