"""The client over several endpoints against the real Triton (session fixture).

Each extra endpoint is a real proxy: the guard (Debian's nginx, deploy/guard.py) in
front of the same server. The guard keeps no access log; these tests turn it on (the
one line of its config changed at start), so every ModelInfer an endpoint carried is a
line in its log: the signal that shows which endpoints a client used.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from abdoserve.deploy import guard as guard_module
from abdoserve.deploy.cli import main as abdoserve_main
from abdoserve.deploy.embedded import EmbeddedServer, free_port
from abdoserve.deploy.guard import GuardLimits, GuardOptions, NginxGuard, TlsFiles
from abdoserve.export.phantom import build_study, write_study
from abdoserve_client.aio import AsyncAbdoServeClient
from abdoserve_client.client import AbdoServeClient
from abdoserve_client.errors import ServerUnavailableError
from abdoserve_client.metrics import ClientMetrics
from tests.pki import Pki, make_pki

TASK = "bone_density_ct"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
render_config = guard_module.render_config


def with_access_log(options: GuardOptions, prefix: Path, workers: Path | None = None) -> str:
    config = render_config(options, prefix, workers)
    assert "access_log off;" in config, "the guard's config changed: update this test"
    return config.replace("access_log off;", f"access_log {prefix / 'access.log'};")


class Guards:
    """Guards started for one test, each with an access log; all stopped at its end."""

    def __init__(self, server: EmbeddedServer, folder: Path) -> None:
        self.server = server
        self.folder = folder
        self.started: list[NginxGuard] = []

    def start(self, tls: TlsFiles | None = None) -> NginxGuard:
        options = GuardOptions(
            host="127.0.0.1",
            grpc_port=free_port(),
            http_port=free_port(),
            upstream_grpc_port=self.server.ports.grpc,
            upstream_http_port=self.server.ports.http,
            limits=GuardLimits(257 * 1024 * 1024),
            tls=tls,
        )
        prefix = self.folder / f"guard{len(self.started)}"
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(guard_module, "render_config", with_access_log)
            started = NginxGuard(options, prefix).start()
        self.started.append(started)
        return started

    def stop_all(self) -> None:
        for started in self.started:
            started.stop()


@pytest.fixture
def guards(server: EmbeddedServer, tmp_path: Path) -> Iterator[Guards]:
    started = Guards(server, tmp_path)
    yield started
    started.stop_all()


def endpoint(guard: NginxGuard, host: str = "127.0.0.1") -> str:
    return f"{host}:{guard.options.grpc_port}"


def inferences(guard: NginxGuard) -> int:
    """ModelInfer requests the guard has logged so far (one access-log line each). nginx
    logs a request after its last byte is sent: a count taken at once may lag."""
    log = guard.prefix / "access.log"
    return log.read_text().count(MODEL_INFER) if log.exists() else 0


def carried(*stopped: NginxGuard) -> list[int]:
    """The ModelInfer requests each guard carried, every log line written: nginx stopped."""
    for guard in stopped:
        guard.stop()
    return [inferences(guard) for guard in stopped]


def kill(guard: NginxGuard) -> None:
    """SIGKILL nginx (master and worker, one process group): the connections drop at once."""
    assert guard.process is not None
    os.killpg(guard.process.pid, signal.SIGKILL)
    guard.process.wait()


@pytest.fixture(scope="module")
def study() -> Sequence[bytes]:
    return build_study(TASK, seed=5).instances


def registry_retries(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("abdoserve_client_retries_total", {"task": TASK}) or 0.0


def test_calls_are_balanced_over_the_server_and_a_proxy(
    guards: Guards, grpc_url: str, study: Sequence[bytes]
) -> None:
    proxy = guards.start()
    with AbdoServeClient([grpc_url, endpoint(proxy)], timeout_s=60) as client:
        results = [client.bone_density_ct(study) for _ in range(20)]
    assert len({float(result.bmd) for result in results}) == 1
    # The proxy carried some of the 20, so the server took the rest directly.
    (through_proxy,) = carried(proxy)
    assert 3 <= through_proxy <= 17, through_proxy


def test_an_endpoint_killed_mid_run_costs_no_call(
    guards: Guards, study: Sequence[bytes], tmp_path: Path
) -> None:
    first, second = guards.start(), guards.start()
    failures: list[BaseException] = []
    answered: list[int] = []
    calls = iter(range(30))
    lock = threading.Lock()
    with AbdoServeClient(f"{endpoint(first)},{endpoint(second)}", timeout_s=60) as client:
        client.task_info(TASK)

        def work() -> None:
            while True:
                with lock:
                    if next(calls, None) is None:
                        return
                try:
                    client.bone_density_ct(study)
                except Exception as error:  # every failure is the finding
                    with lock:
                        failures.append(error)
                else:
                    with lock:
                        answered.append(1)

        workers = [threading.Thread(target=work) for _ in range(3)]
        for worker in workers:
            worker.start()
        while inferences(first) < 4 and any(worker.is_alive() for worker in workers):
            threading.Event().wait(0.05)
        kill(first)  # with three callers, calls are in flight on both endpoints
        for worker in workers:
            worker.join(timeout=300)
    assert failures == [], failures
    assert len(answered) == 30
    by_first, by_second = carried(first, second)
    assert by_first >= 4
    # The first answered at most what it logged plus the three calls in flight at the kill.
    assert by_second >= 30 - by_first - 3, (by_first, by_second)
    # The kill took effect: alone, the first endpoint answers nothing.
    with (
        AbdoServeClient(endpoint(first), timeout_s=10, retries=1, backoff_s=0.01) as alone,
        pytest.raises(ServerUnavailableError),
    ):
        alone.bone_density_ct(study)


def test_a_dead_endpoint_costs_no_retry(grpc_url: str, study: Sequence[bytes]) -> None:
    registry = CollectorRegistry()
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    with AbdoServeClient([dead, grpc_url], timeout_s=60, metrics=ClientMetrics(registry)) as client:
        for _ in range(10):
            client.bone_density_ct(study)
    # round_robin never picked the endpoint that refuses connections: no UNAVAILABLE at all
    assert registry_retries(registry) == 0


def test_all_endpoints_dead_is_unavailable_after_the_retries() -> None:
    sleeps: list[float] = []
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    with AbdoServeClient(dead, timeout_s=30, retries=2, backoff_s=0.01) as nobody:
        nobody._sleep = sleeps.append
        assert not nobody.is_ready()
        with pytest.raises(ServerUnavailableError, match="after 3 attempts"):
            nobody.bone_density_ct([b"never sent"])
    assert sleeps == pytest.approx([0.01, 0.02])


def test_all_endpoints_dead_fails_at_once_when_no_retry_fits_the_deadline() -> None:
    sleeps: list[float] = []
    dead = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    with AbdoServeClient(dead, timeout_s=1.0, retries=5, backoff_s=2.0) as nobody:
        nobody._sleep = sleeps.append
        with pytest.raises(ServerUnavailableError, match=r"after 1 attempts \(the 1 s deadline"):
            nobody.bone_density_ct([b"never sent"])
    assert sleeps == []


def test_a_dns_target_is_resolved_by_grpc(guards: Guards, study: Sequence[bytes]) -> None:
    proxy = guards.start()  # gRPC resolves the name itself (and re-resolves it)
    with AbdoServeClient(f"dns:///localhost:{proxy.options.grpc_port}", timeout_s=60) as client:
        for _ in range(3):
            client.bone_density_ct(study)
    assert carried(proxy) == [3]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_tls_over_a_list_checks_the_shared_host_name(
    guards: Guards, pki: Pki, study: Sequence[bytes], host: str
) -> None:
    tls = TlsFiles(pki.server.certificate, pki.server.key)  # for localhost and 127.0.0.1
    first, second = guards.start(tls), guards.start(tls)
    with AbdoServeClient(
        [endpoint(first, host), endpoint(second, host)],
        timeout_s=60,
        ssl=True,
        root_certificates=str(pki.ca),
    ) as client:
        for _ in range(6):
            client.bone_density_ct(study)
    counts = carried(first, second)
    assert sum(counts) == 6 and min(counts) >= 1, counts


def test_tls_with_a_name_the_certificates_do_not_carry_is_refused(
    guards: Guards, pki: Pki, study: Sequence[bytes]
) -> None:
    tls = TlsFiles(pki.server.certificate, pki.server.key)
    first, second = guards.start(tls), guards.start(tls)
    with (
        AbdoServeClient(
            [endpoint(first), endpoint(second)],
            timeout_s=10,
            retries=0,
            ssl=True,
            root_certificates=str(pki.ca),
            tls_server_name="abdoserve.elsewhere.example",
        ) as client,
        pytest.raises(ServerUnavailableError),
    ):
        client.bone_density_ct(study)
    assert carried(first, second) == [0, 0]


def test_the_async_client_balances_too(guards: Guards, study: Sequence[bytes]) -> None:
    first, second = guards.start(), guards.start()

    async def calls() -> None:
        async with AsyncAbdoServeClient(
            [endpoint(first), endpoint(second)], timeout_s=60
        ) as client:
            await client.task_info(TASK)
            await asyncio.gather(*(client.bone_density_ct(study) for _ in range(8)))

    asyncio.run(calls())
    counts = carried(first, second)
    assert sum(counts) == 8 and min(counts) >= 1, counts


@pytest.fixture
def abdoserve() -> Callable[[Sequence[str]], int]:
    return abdoserve_main


def test_cli_url_takes_a_list(
    abdoserve: Callable[[Sequence[str]], int],
    guards: Guards,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first, second = guards.start(), guards.start()
    folder = tmp_path / "study"
    write_study(build_study(TASK, seed=5), folder)
    urls = f"{endpoint(first)},{endpoint(second)}"
    for _ in range(2):
        assert abdoserve(["infer", TASK, str(folder), "--url", urls, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["answer"]["task"] == TASK
    assert sum(carried(first, second)) == 2
