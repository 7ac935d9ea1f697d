"""Closed by default, tried as an outsider would: the admin APIs without the key, TLS and
mutual TLS in front of the real server, patient identifiers looked for everywhere a
study passes (shared memory as another user of the host, logs, metrics, errors, the
launcher's output), and a client that hangs up mid-request."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from abdoserve.deploy import stubs
from abdoserve.deploy.embedded import EmbeddedServer, free_port
from abdoserve.deploy.guard import GuardLimits, GuardOptions, NginxGuard, ProxiedPort, TlsFiles
from abdoserve.deploy.model_control import ADMIN_HEADER, GRPC_HEADER_PREFIX, SHM_HEADER
from abdoserve.export.phantom import build_study
from abdoserve_client import AbdoServeClient
from abdoserve_client.errors import AbdoServeError
from tests.pki import Pki, make_pki, make_rsa_server

pytestmark = [
    # The identifier sent as a Modality on purpose (a CS value may not hold it).
    pytest.mark.filterwarnings("ignore:Invalid value for VR CS"),
]

TASK = "bone_density_ct"
WAIT_S = 180.0
# Distinctive identifiers: none of them may appear anywhere but in the request itself.
PATIENT = {
    "PatientName": "Qzvyx^Marisol^Wendeborn",
    "PatientID": "QZV-77123-ID",
    "PatientBirthDate": "19310417",
    "OtherPatientIDs": "QZV-ALIAS-5581",
    "ReferringPhysicianName": "Wendeborn^Ottilie",
}
IDENTIFIERS = ("Qzvyx", "Marisol", "Wendeborn", "QZV-77123", "19310417", "QZV-ALIAS", "Ottilie")


# --- certificates, and the guard's TLS in front of the session server -----------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_guard(server: EmbeddedServer, tls: TlsFiles, prefix: Path) -> NginxGuard:
    options = GuardOptions(
        host="127.0.0.1",
        grpc_port=free_port(),
        http_port=free_port(),
        upstream_grpc_port=server.ports.grpc,
        upstream_http_port=server.ports.http,
        limits=GuardLimits(257 * 1024 * 1024),
        tls=tls,
        proxied=(ProxiedPort(free_port(), server.ports.metrics),),
    )
    return NginxGuard(options, prefix).start()


@pytest.fixture(scope="module")
def tls_only(
    server: EmbeddedServer, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NginxGuard]:
    guard = tls_guard(
        server, TlsFiles(pki.server.certificate, pki.server.key), tmp_path_factory.mktemp("tls")
    )
    yield guard
    guard.stop()


@pytest.fixture(scope="module")
def mutual(
    server: EmbeddedServer, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NginxGuard]:
    tls = TlsFiles(pki.server.certificate, pki.server.key, client_ca=pki.ca)
    guard = tls_guard(server, tls, tmp_path_factory.mktemp("mtls"))
    yield guard
    guard.stop()


def url(guard: NginxGuard) -> str:
    return f"127.0.0.1:{guard.options.grpc_port}"


def bone_density(client: AbdoServeClient) -> np.ndarray:
    values: np.ndarray = client.bone_density_ct(build_study(TASK, seed=4).instances).study_values
    return values


@pytest.fixture(scope="module")
def reference(grpc_url: str) -> np.ndarray:
    with AbdoServeClient(grpc_url, timeout_s=60) as client:
        return bone_density(client)


def test_a_tls_call_verifies_the_server_and_answers_as_plaintext_does(
    tls_only: NginxGuard, pki: Pki, reference: np.ndarray
) -> None:
    with AbdoServeClient(url(tls_only), ssl=True, root_certificates=str(pki.ca)) as client:
        np.testing.assert_allclose(bone_density(client), reference, rtol=1e-6)


def test_a_plaintext_call_to_the_tls_port_fails(tls_only: NginxGuard) -> None:
    with (
        AbdoServeClient(url(tls_only), timeout_s=10, retries=0) as client,
        pytest.raises(AbdoServeError) as refused,
    ):
        bone_density(client)
    assert refused.value.code == "UNAVAILABLE"


def test_a_server_certificate_from_an_unknown_ca_is_refused_by_the_client(
    tls_only: NginxGuard, pki: Pki
) -> None:
    with (
        AbdoServeClient(
            url(tls_only), ssl=True, root_certificates=str(pki.stranger_ca), retries=0
        ) as client,
        pytest.raises(AbdoServeError) as refused,
    ):
        bone_density(client)
    assert refused.value.code == "UNAVAILABLE"


def test_https_serves_health_and_metrics_and_plain_http_is_refused(
    tls_only: NginxGuard, pki: Pki
) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca))
    ready = f"https://127.0.0.1:{tls_only.options.http_port}/v2/health/ready"
    with urllib.request.urlopen(ready, context=context, timeout=10) as reply:
        assert reply.status == 200
    metrics = f"https://127.0.0.1:{tls_only.options.proxied[0].public}/metrics"
    with urllib.request.urlopen(metrics, context=context, timeout=10) as reply:
        assert b"nv_inference_request_success" in reply.read()
    plain = f"http://127.0.0.1:{tls_only.options.http_port}/v2/health/ready"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(plain, timeout=10)
    assert refused.value.code == 400  # nginx: "plain HTTP request was sent to HTTPS port"


@pytest.fixture(scope="module")
def rsa_guard(
    server: EmbeddedServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NginxGuard]:
    """TLS with an RSA certificate: the one kind with which a client could agree on an
    RSA-key-exchange suite at all."""
    identity = make_rsa_server(tmp_path_factory.mktemp("rsa"))
    guard = tls_guard(
        server, TlsFiles(identity.certificate, identity.key), tmp_path_factory.mktemp("rsa-guard")
    )
    yield guard
    guard.stop()


def tls12_client(cipher: str) -> ssl.SSLContext:
    """A TLS 1.2 client that offers `cipher` alone (it need not trust the server)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(cipher)
    return context


def handshake(port: int, context: ssl.SSLContext) -> str:
    """The suite the server agreed on (ssl.SSLError where it agreed on none)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        agreed = tls.cipher()
        assert agreed is not None
        return agreed[0]


@pytest.mark.parametrize("port", ["gRPC", "HTTP", "metrics"])
def test_tls_refuses_a_suite_without_forward_secrecy_and_agrees_on_ecdhe_aes_gcm(
    rsa_guard: NginxGuard, port: str
) -> None:
    options = rsa_guard.options
    number = {"gRPC": options.grpc_port, "HTTP": options.http_port}.get(
        port, options.proxied[0].public
    )
    with pytest.raises(ssl.SSLError):
        handshake(number, tls12_client("AES128-SHA"))  # RSA key exchange, CBC
    modern = "ECDHE-RSA-AES128-GCM-SHA256"
    assert handshake(number, tls12_client(modern)) == modern


def https_reply(
    port: int, context: ssl.SSLContext, method: str, path: str, headers: dict[str, str]
) -> tuple[int, str | None, bytes]:
    """Status, Server header and body of one HTTP/1.1 request over TLS."""
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    try:
        connection.request(method, path, headers=headers)
        reply = connection.getresponse()
        return reply.status, reply.getheader("Server"), reply.read()
    finally:
        connection.close()


def test_the_guard_names_no_version_in_replies_or_error_pages(
    tls_only: NginxGuard, pki: Pki
) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca))
    options = tls_only.options
    too_large = {"Content-Length": str(options.limits.max_body_bytes + 1)}  # refused at once
    replies = {
        "health": https_reply(options.http_port, context, "GET", "/v2/health/ready", {}),
        "metrics": https_reply(options.proxied[0].public, context, "GET", "/metrics", {}),
        "a 413": https_reply(options.http_port, context, "POST", "/v2/models/x/infer", too_large),
    }
    # The gRPC port's own error page: plain HTTP sent to its TLS listener (a 400).
    plain = http.client.HTTPConnection("127.0.0.1", options.grpc_port, timeout=30)
    try:
        plain.request("GET", "/")
        reply = plain.getresponse()
        replies["plain HTTP to the gRPC port"] = (
            reply.status,
            reply.getheader("Server"),
            reply.read(),
        )
    finally:
        plain.close()
    statuses = {what: reply[0] for what, reply in replies.items()}
    assert statuses == {
        "health": 200,
        "metrics": 200,
        "a 413": 413,
        "plain HTTP to the gRPC port": 400,
    }
    assert {what: reply[1] for what, reply in replies.items()} == dict.fromkeys(replies, "nginx")
    for what in ("a 413", "plain HTTP to the gRPC port"):  # the error pages: no version
        assert b"<center>nginx</center>" in replies[what][2], replies[what][2]


def test_mutual_tls_admits_a_client_certificate_the_ca_signed(
    mutual: NginxGuard, pki: Pki, reference: np.ndarray
) -> None:
    with AbdoServeClient(
        url(mutual),
        ssl=True,
        root_certificates=str(pki.ca),
        private_key=str(pki.client.key),
        certificate_chain=str(pki.client.certificate),
    ) as client:
        np.testing.assert_allclose(bone_density(client), reference, rtol=1e-6)


@pytest.mark.parametrize("who", ["no certificate", "a stranger's certificate"])
def test_mutual_tls_refuses_other_clients_as_unauthenticated(
    mutual: NginxGuard, pki: Pki, who: str
) -> None:
    identity = pki.stranger if who == "a stranger's certificate" else None
    with (
        AbdoServeClient(
            url(mutual),
            ssl=True,
            root_certificates=str(pki.ca),
            private_key=None if identity is None else str(identity.key),
            certificate_chain=None if identity is None else str(identity.certificate),
            retries=0,
        ) as client,
        pytest.raises(AbdoServeError) as refused,
    ):
        bone_density(client)
    assert refused.value.code == "UNAUTHENTICATED"
    assert "client certificate" in str(refused.value)


# --- the admin APIs, on the session server ---------------------------------------------


@dataclass(frozen=True)
class AdminCall:
    name: str
    category: str

    def run(self, client: grpcclient.InferenceServerClient, headers: dict[str, str]) -> None:
        if self.name == "register shared memory":
            client.register_system_shared_memory("probe", "abdoserve_probe", 64, headers=headers)
        elif self.name == "change logging":
            client.update_log_settings({"log_verbose_level": 0}, headers=headers)
        elif self.name == "load a model":
            client.load_model(f"{TASK}_explain", headers=headers)
        elif self.name == "read statistics":
            client.get_inference_statistics(TASK, headers=headers)
        elif self.name == "read trace settings":
            client.get_trace_settings(headers=headers)


ADMIN_CALLS = [
    AdminCall("register shared memory", "shared-memory"),
    AdminCall("change logging", "logging"),
    AdminCall("load a model", "model-repository"),
    AdminCall("read statistics", "statistics"),
    AdminCall("read trace settings", "trace"),
]


@pytest.mark.parametrize("call", ADMIN_CALLS, ids=lambda call: call.name)
def test_admin_grpc_calls_are_refused_without_the_key(grpc_url: str, call: AdminCall) -> None:
    client = grpcclient.InferenceServerClient(grpc_url)
    for headers in ({}, {GRPC_HEADER_PREFIX + ADMIN_HEADER: "a-guess"}):
        with pytest.raises(InferenceServerException) as refused:
            call.run(client, headers)
        assert "restricted" in str(refused.value.message())


@pytest.mark.parametrize("call", ADMIN_CALLS, ids=lambda call: call.name)
def test_admin_grpc_calls_pass_with_the_key(
    grpc_url: str, call: AdminCall, admin_headers: dict[str, str]
) -> None:
    client = grpcclient.InferenceServerClient(grpc_url)
    if call.category != "shared-memory":
        call.run(client, admin_headers)
        return
    # The key opens the API; the host's /dev/shm stays out of the server's sight (its
    # own tmpfs), so a region a host process made cannot be mapped.
    region = shm.create_shared_memory_region("probe", "/abdoserve_probe", 64)
    try:
        with pytest.raises(InferenceServerException) as failed:
            call.run(client, admin_headers)
        message = str(failed.value.message())
        assert "restricted" not in message and "abdoserve_probe" in message
    finally:
        shm.destroy_shared_memory_region(region)


def http_post(server: EmbeddedServer, path: str, body: dict[str, object], key: str | None) -> int:
    headers = {"Content-Type": "application/json"} | ({} if key is None else {ADMIN_HEADER: key})
    request = urllib.request.Request(
        server.url(path), data=json.dumps(body).encode(), method="POST", headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_admin_http_calls_are_refused_without_the_key_and_pass_with_it(
    server: EmbeddedServer,
) -> None:
    key = server.options.admin_key
    calls = {
        "/v2/logging": {"log_verbose_level": 0},
        f"/v2/repository/models/{TASK}_explain/load": {},
        "/v2/systemsharedmemory/status": {},
        "/v2/trace/setting": {},
    }
    for path, body in calls.items():
        assert http_post(server, path, body, None) == 403, path
        assert http_post(server, path, body, "a-guess") == 403, path
    for path in ("/v2/logging", f"/v2/repository/models/{TASK}_explain/load"):
        assert http_post(server, path, calls[path], key) == 200, path
    assert server.is_ready()


# --- cancellations are not failures ---------------------------------------------------


REGION_BYTES = 64 << 20  # the shared region: room for one study
LARGE_TASK = "esophageal_cancer_ct"  # its largest studies take long enough to hang up on


def counters(server: EmbeddedServer, task: str = LARGE_TASK) -> dict[str, float]:
    """Triton's counters of `task`'s public model (failures by reason, successes), its
    composing models' CANCELED failures where it is an ensemble, and our refusals."""
    with urllib.request.urlopen(
        f"http://127.0.0.1:{server.ports.metrics}/metrics", timeout=10
    ) as reply:
        text = reply.read().decode()
    found = dict.fromkeys(("failed", "cancelled", "succeeded", "received", "refused"), 0.0)
    found["dropped"] = 0.0
    for line in text.splitlines():
        match = re.match(r"(\w+)\{(.*)\} (\S+)$", line)
        if match is None:
            continue
        name, labels, value = match.group(1), match.group(2), float(match.group(3))
        if f'task="{task}"' in labels and name in OUR_COUNTS:
            found[OUR_COUNTS[name]] += value
        model = re.search(r'model="([^"]+)"', labels)
        if model is None or model.group(1) not in (task, *composing_models(task)):
            continue
        public = model.group(1) == task
        if name == "nv_inference_request_failure" and 'reason="CANCELED"' in labels:
            found["cancelled"] += value
        elif name == "nv_inference_request_failure" and public:
            found["failed"] += value
        elif name == "nv_inference_request_success" and public:
            found["succeeded"] += value
    return found


OUR_COUNTS = {
    "abdoserve_received_bytes_total": "received",  # counted as decoding starts on it
    "abdoserve_rejected_requests_total": "refused",
    "abdoserve_cancelled_requests_total": "dropped",  # the fused model's cancellations
}


def composing_models(task: str) -> tuple[str, ...]:
    return (f"{task}_preprocess", f"{task}_net", f"{task}_postprocess")


def server_failures(delta: dict[str, float], shape: str) -> float:
    """As the recording rule task:nv_inference_request_failure counts them. The ensemble:
    half its failures (Triton counts each twice, a cancelled one too), less the
    cancellations. The fused model: its refusals (Triton counts the error responses of
    a Python model as successes) and its failures other than cancellations."""
    if shape == "ensemble":
        return delta["failed"] / 2 - delta["cancelled"]
    return delta["refused"] + delta["failed"]


def ended(delta: dict[str, float], shape: str) -> float:
    """Requests that ended without an answer: the ensemble's in Triton's failures, the
    fused model's in our count of the requests it dropped (Triton counts those as
    successes: the error response of a Python model)."""
    return delta["dropped"] if shape == "fused" else delta["failed"]


HANG_UP_CLIENT = """
import sys
from abdoserve_client import AbdoServeClient
from abdoserve.export.phantom import build_study
halves = [build_study("esophageal_cancer_ct", seed=s, slices=64, interval_mm=5.0) for s in (1, 2)]
print("sending", flush=True)
with AbdoServeClient(sys.argv[1], timeout_s=300, retries=0) as client:
    client.esophageal_cancer_ct(halves[0].instances + halves[1].instances)
"""


@pytest.mark.parametrize("shape", ["fused", "ensemble"])
def test_a_client_that_hangs_up_mid_request_is_not_a_server_failure(
    server: EmbeddedServer, ensemble_server: EmbeddedServer, shape: str
) -> None:
    served = server if shape == "fused" else ensemble_server
    url = f"{served.options.host}:{served.ports.grpc}"
    before = counters(served)

    def change() -> dict[str, float]:
        now = counters(served)
        return {name: now[name] - before[name] for name in before}

    child = subprocess.Popen(
        [sys.executable, "-c", HANG_UP_CLIENT, url], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "sending"
    # Preprocessing 128 slices takes seconds: the client hangs up while it runs.
    wait_for(lambda: change()["received"] > 0, "the request to arrive")
    child.send_signal(signal.SIGKILL)  # the connection drops, no goodbye
    child.wait()
    wait_for(lambda: ended(change(), shape) > 0, "the abandoned request to end", change)
    hung_up = change()
    if shape == "fused":  # answered CANCELLED before the network ran
        assert hung_up["dropped"] == 1 and hung_up["cancelled"] == 0, hung_up
    else:
        assert hung_up["cancelled"] == 1 and hung_up["succeeded"] == 0, hung_up
    assert server_failures(hung_up, shape) == 0
    # The same measure does count a real failure: a refused study.
    with AbdoServeClient(url, retries=0) as client, pytest.raises(AbdoServeError):
        client.infer(LARGE_TASK, [b"not a DICOM file"])
    wait_for(lambda: server_failures(change(), shape) >= 1, "the refusal's count")
    assert server_failures(change(), shape) == 1
    assert served.is_ready()


def wait_for(condition: object, what: str, seen: Callable[[], object] = lambda: None) -> None:
    assert callable(condition)
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}: {seen()}"
        time.sleep(0.05)


# --- `abdoserve serve` as an operator runs it: TLS, mutual TLS, keys from files ---------


@dataclass
class Served:
    """A running `abdoserve serve` and what it printed."""

    process: subprocess.Popen[str]
    grpc: int
    http: int
    metrics: int
    health: int
    log_file: Path
    admin_key: str
    shm_key: str
    region: str
    region_handle: object
    pki: Pki
    output: list[str]

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def client(self, **options: object) -> AbdoServeClient:
        return AbdoServeClient(
            self.url,
            ssl=True,
            root_certificates=str(self.pki.ca),
            private_key=str(self.pki.client.key),
            certificate_chain=str(self.pki.client.certificate),
            **options,  # type: ignore[arg-type]
        )

    def triton(self) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(
            self.url,
            ssl=True,
            root_certificates=str(self.pki.ca),
            private_key=str(self.pki.client.key),
            certificate_chain=str(self.pki.client.certificate),
        )

    def https(self, port: int, path: str) -> bytes:
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        context.load_cert_chain(str(self.pki.client.certificate), str(self.pki.client.key))
        with urllib.request.urlopen(
            f"https://127.0.0.1:{port}{path}", context=context, timeout=30
        ) as reply:
            body: bytes = reply.read()
            return body


def write_key(path: Path, key: str) -> Path:
    path.write_text(key + "\n")
    path.chmod(0o600)
    return path


def read_output(process: subprocess.Popen[str], lines: list[str], ready: threading.Event) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if line.startswith("Ctrl-C stops the server."):  # the announcement's last line
            ready.set()
    ready.set()  # exited: the waiter looks at the process


@pytest.fixture(scope="module")
def served(
    built_repository: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("served")
    region = f"abdoserve_test_region_{os.getpid()}"
    handle = shm.create_shared_memory_region(region, f"/{region}", REGION_BYTES)
    os.chmod(f"/dev/shm/{region}", 0o600)
    ports = {name: free_port() for name in ("grpc", "http", "metrics", "health")}
    admin_key, shm_key = "admin-" + os.urandom(16).hex(), "shm-" + os.urandom(16).hex()
    command = [
        str(Path(sys.executable).parent / "abdoserve"),
        "serve",
        f"--repository={built_repository}",
        f"--grpc-port={ports['grpc']}",
        f"--http-port={ports['http']}",
        f"--metrics-port={ports['metrics']}",
        f"--supervisor-port={ports['health']}",
        f"--log-file={folder / 'triton.log'}",
        "--guard=on",
        "--shm-isolation=private",
        f"--tls-cert={pki.server.certificate}",
        f"--tls-key={pki.server.key}",
        f"--tls-client-ca={pki.ca}",
        f"--admin-key-file={write_key(folder / 'admin.key', admin_key)}",
        f"--shared-region={region}",
        f"--shm-key-file={write_key(folder / 'shm.key', shm_key)}",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    lines: list[str] = []
    ready = threading.Event()
    threading.Thread(target=read_output, args=(process, lines, ready), daemon=True).start()
    ready.wait(WAIT_S)
    assert process.poll() is None, "".join(lines)
    try:
        yield Served(
            process,
            *ports.values(),
            log_file=folder / "triton.log",
            admin_key=admin_key,
            shm_key=shm_key,
            region=region,
            region_handle=handle,
            pki=pki,
            output=lines,
        )
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
        shm.destroy_shared_memory_region(handle)


def test_serve_announces_tls_endpoints_and_warns_of_nothing(served: Served) -> None:
    text = "".join(served.output)
    assert f"https://127.0.0.1:{served.http}/v2/health/ready" in text
    assert "--tls --root-cert CA.pem --client-cert CERT.pem --client-key KEY.pem" in text
    assert "warning" not in text.lower()
    assert served.admin_key not in text and served.shm_key not in text


def test_serve_with_mutual_tls_answers_an_authenticated_client(
    served: Served, reference: np.ndarray
) -> None:
    with served.client() as client:
        np.testing.assert_allclose(bone_density(client), reference, rtol=1e-6)
    with (
        AbdoServeClient(
            served.url, ssl=True, root_certificates=str(served.pki.ca), retries=0
        ) as anonymous,
        pytest.raises(AbdoServeError) as refused,
    ):
        bone_density(anonymous)
    assert refused.value.code == "UNAUTHENTICATED"


def test_serve_keeps_admin_apis_behind_the_key_from_its_file(served: Served) -> None:
    client = served.triton()
    with pytest.raises(InferenceServerException) as refused:
        client.update_log_settings({"log_verbose_level": 1})
    assert "restricted" in str(refused.value.message())
    admin = {GRPC_HEADER_PREFIX + ADMIN_HEADER: served.admin_key}
    client.update_log_settings({"log_verbose_level": 0}, headers=admin)
    health = json.loads(served.https(served.http, "/v2/health/ready") or b"{}")
    assert health == {}


def test_the_shared_region_is_one_named_region_under_its_own_key(
    served: Served, reference: np.ndarray
) -> None:
    """The opt-in: the sender's own /dev/shm file is visible to the server under its
    name, registered with the shared-memory key (the admin key does not open it), and
    a study read from it is answered as the same study sent inline."""
    client = served.triton()
    region = served.region
    admin = {GRPC_HEADER_PREFIX + ADMIN_HEADER: served.admin_key}
    sender = {GRPC_HEADER_PREFIX + SHM_HEADER: served.shm_key}
    for headers in ({}, admin):
        with pytest.raises(InferenceServerException) as refused:
            client.register_system_shared_memory(
                region, f"/{region}", REGION_BYTES, headers=headers
            )
        assert "restricted" in str(refused.value.message())
    instances = build_study(TASK, seed=4).instances
    payload = serialize_byte_tensor(np.array([list(instances)], dtype=np.object_))
    shm.set_shared_memory_region(served.region_handle, [payload])
    size = len(payload.item())
    client.register_system_shared_memory(region, f"/{region}", REGION_BYTES, headers=sender)
    try:
        dicom = grpcclient.InferInput("DICOM", [1, len(instances)], "BYTES")
        dicom.set_shared_memory(region, size)
        result = client.infer(TASK, [dicom], outputs=[grpcclient.InferRequestedOutput("STUDY")])
        np.testing.assert_allclose(result.as_numpy("STUDY")[0], reference, rtol=1e-6)
    finally:
        client.unregister_system_shared_memory(region, headers=sender)


def with_identifiers(instance: bytes, **changes: object) -> bytes:
    dataset = pydicom.dcmread(io.BytesIO(instance))
    for keyword, value in {**PATIENT, **changes}.items():
        setattr(dataset, keyword, value)
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


def identified_studies() -> dict[str, list[bytes]]:
    """One valid study carrying the identifiers, and broken ones that are refused at
    different depths of the intake."""
    instances = list(build_study(TASK, seed=6).instances)
    valid = [with_identifiers(instance) for instance in instances]
    return {
        "valid": valid,
        "wrong modality": [with_identifiers(instance, Modality="MR") for instance in instances],
        "truncated": [*valid[:-1], valid[-1][: len(valid[-1]) // 2]],
        "rows that lie": [with_identifiers(instances[0], Rows=4096), *valid[1:]],
        "identifier as modality": [with_identifiers(instances[0], Modality=PATIENT["PatientID"])],
    }


SHM_READER = """
import glob, json, os, sys
markers = [marker.encode() for marker in sys.argv[1:]]
readable, leaked = [], []
for folder in ["/dev/shm", *glob.glob("/proc/[0-9]*/root/dev/shm")]:
    try:
        names = os.listdir(folder)
    except OSError:
        continue
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError:
            continue
        readable.append(path)
        if any(marker in data for marker in markers):
            leaked.append(path)
print(json.dumps({"readable": readable, "leaked": leaked}))
"""


def shared_memory_as_another_user() -> dict[str, list[str]]:
    """What `nobody` can read in /dev/shm, the host's and every process's own."""
    reader = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            SHM_READER,
            *IDENTIFIERS,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    found: dict[str, list[str]] = json.loads(reader.stdout)
    return found


def assert_no_identifier(text: str, where: str) -> None:
    for identifier in IDENTIFIERS:
        assert identifier.lower() not in text.lower(), f"{identifier} in {where}"


@pytest.mark.skipif(os.geteuid() != 0, reason="reading as another user needs root to switch")
def test_patient_identifiers_stay_in_the_request(served: Served) -> None:
    errors = []
    with served.client(retries=0) as client:
        for name, study in identified_studies().items():
            try:
                client.bone_density_ct(study)
                assert name == "valid", f"{name} was answered"
            except AbdoServeError as error:
                assert name != "valid", error
                errors.append(f"{name}: {error}")
    assert len(errors) == 4
    # Shared memory, while the server runs, as an unprivileged user of the host: no
    # region of the server is readable, and no readable file holds an identifier.
    seen = shared_memory_as_another_user()
    assert seen["leaked"] == []
    ours = ("abdoserve_shm_", "triton_python_backend_shm", "abdoserve-shm")
    assert not [path for path in seen["readable"] if any(tag in path for tag in ours)]
    # Errors, metrics (Triton's and the supervisor's), logs (Triton's and the guard's),
    # and what the launcher printed.
    assert_no_identifier("\n".join(errors), "an error message")
    assert_no_identifier(served.https(served.metrics, "/metrics").decode(), "Triton's metrics")
    assert_no_identifier(served.https(served.health, "/metrics").decode(), "supervisor metrics")
    for path in served.log_file.parent.rglob("*"):
        if path.is_file() and path.suffix not in (".key",):
            assert_no_identifier(path.read_text(errors="replace"), str(path))
    assert_no_identifier("".join(served.output), "the launcher's output")


def triton_ports(served: Served) -> dict[str, int]:
    """The loopback ports the served tritonserver listens on behind the guard."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and stubs.parent_of(int(entry.name)) == served.process.pid:
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
            if argv[0].endswith("tritonserver"):
                flags = dict(arg[2:].split("=", 1) for arg in argv[1:] if "=" in arg)
                return {"grpc": int(flags["grpc-port"]), "http": int(flags["http-port"])}
    raise AssertionError("no tritonserver under the served launcher")


def test_triton_behind_the_guard_serves_inference_to_the_guard_alone(served: Served) -> None:
    """A user of the host who finds Triton's loopback ports cannot get past mutual TLS
    and the guard's limits by calling them directly."""
    ports = triton_ports(served)
    instances = build_study(TASK, seed=4).instances
    with (
        AbdoServeClient(f"127.0.0.1:{ports['grpc']}", retries=0) as direct,
        pytest.raises(AbdoServeError) as refused,
    ):
        direct.bone_density_ct(instances)
    assert "restricted" in str(refused.value)
    assert http_status(f"http://127.0.0.1:{ports['http']}/v2/models/{TASK}/infer") == 403
    with served.client() as client:  # through the guard, the same call is answered
        assert client.bone_density_ct(instances).study_values.shape == (1,)


def http_status(address: str) -> int:
    request = urllib.request.Request(address, data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
