"""Several endpoints and the call deadline, without a server: channel targets, the budget."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from tritonclient.grpc import model_config_pb2, service_pb2

import abdoserve_client.client
from abdoserve_client import cli
from abdoserve_client.aio import AsyncAbdoServeClient
from abdoserve_client.client import AbdoServeClient
from abdoserve_client.endpoints import (
    ROUND_ROBIN,
    ChannelTarget,
    channel_target,
    endpoint_list,
    resolve_host,
)
from abdoserve_client.errors import DeadlineExceededError, ServerUnavailableError
from abdoserve_client.results import FibrosisResult
from abdoserve_client.wire import RawInfer, bytes_tensor
from tests.unit.test_client import FIBROSIS, parameters, triton_error
from tests.unit.test_client_metrics import FakeResponse

TASK = "liver_fibrosis_ct"
HOSTS = {
    "a.hospital.local": ["10.0.0.1", "10.0.0.2"],
    "b.hospital.local": ["10.0.0.3"],
    "dual.hospital.local": ["fd00::7", "10.0.0.4"],
    "localhost": ["127.0.0.1"],
}


def fake_resolve(host: str, port: int) -> list[str]:
    if host not in HOSTS:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return HOSTS[host]


def target(url: str | list[str], *, ssl: bool = False, name: str | None = None) -> ChannelTarget:
    return channel_target(url, ssl=ssl, tls_server_name=name, resolve=fake_resolve)


# --- channel targets ---------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "127.0.0.1:8001",
        "abdoserve.hospital.local:8001",
        "dns:///abdoserve.hospital.local:8001",
        "ipv4:10.0.0.1:8001,10.0.0.2:8001",  # already a gRPC target: passed on as it is
        "[::1]:8001",
    ],
)
def test_one_target_is_passed_on_as_given_with_round_robin(url: str) -> None:
    assert target(url) == ChannelTarget(url, (ROUND_ROBIN,))


def test_a_list_of_ipv4_literals_is_one_ipv4_target() -> None:
    expected = ChannelTarget("ipv4:10.0.0.1:8001,10.0.0.2:8002", (ROUND_ROBIN,))
    assert target("10.0.0.1:8001,10.0.0.2:8002") == expected
    assert target([" 10.0.0.1:8001", "10.0.0.2:8002 "]) == expected
    assert target("10.0.0.1:8001,10.0.0.1:8001,10.0.0.2:8002") == expected  # duplicates once


def test_ipv6_literals_and_mixed_families_are_one_ipv6_target() -> None:
    assert target("[::1]:8001,[fd00::2]:8002").target == "ipv6:[::1]:8001,[fd00::2]:8002"
    mixed = target(["[::1]:8001", "127.0.0.1:8002"]).target
    assert mixed == "ipv6:[::1]:8001,[::ffff:127.0.0.1]:8002"


def test_host_names_are_resolved_to_every_address() -> None:
    resolved = target("a.hospital.local:8001,b.hospital.local:8002,10.0.0.9:8003")
    assert resolved.target == "ipv4:10.0.0.1:8001,10.0.0.2:8001,10.0.0.3:8002,10.0.0.9:8003"
    assert resolved.options == (ROUND_ROBIN,)
    dual = target("dual.hospital.local:8001,b.hospital.local:8001").target
    assert dual == "ipv6:[fd00::7]:8001,[::ffff:10.0.0.4]:8001,[::ffff:10.0.0.3]:8001"


def test_a_host_that_does_not_resolve_is_left_out_and_none_is_unavailable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="abdoserve_client"):
        assert target("gone.local:8001,b.hospital.local:8001").target == "ipv4:10.0.0.3:8001"
    assert "gone.local:8001 left out" in caplog.text
    with pytest.raises(ServerUnavailableError, match="none of the endpoints"):
        target("gone.local:8001,also-gone.local:8001")


def test_the_real_resolver_lists_addresses() -> None:
    assert "127.0.0.1" in resolve_host("127.0.0.1", 8001)
    assert resolve_host("localhost", 8001)  # the OS's own answer, IPv4 and/or IPv6


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("", "no endpoint"),
        (" , ", "no endpoint"),
        ("a.hospital.local,b.hospital.local:8001", "not HOST:PORT"),
        ("10.0.0.1:80x1,10.0.0.2:8001", "not HOST:PORT"),
        ("::1:8001,::2:8001", r"\[address\]:port"),
    ],
)
def test_malformed_lists_are_refused(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        target(url)


def test_a_one_entry_list_is_a_single_target() -> None:
    assert endpoint_list("host:8001,") == ["host:8001"]
    assert target(["host:8001"]).target == "host:8001"


def test_tls_over_a_list_checks_one_server_name() -> None:
    authority = ("grpc.default_authority", "localhost")
    same_host = target("localhost:8001,localhost:8002", ssl=True)
    assert same_host.options == (ROUND_ROBIN, authority)
    assert target("[::1]:8001,[::1]:8002", ssl=True).options[1] == (
        "grpc.default_authority",
        "[::1]",
    )
    with pytest.raises(ValueError, match="tls_server_name"):
        target("a.hospital.local:8001,b.hospital.local:8001", ssl=True)
    named = target("a.hospital.local:8001,b.hospital.local:8001", ssl=True, name="localhost")
    assert named.options == (ROUND_ROBIN, authority)
    assert target("10.0.0.1:8001", ssl=True, name="localhost").options == (ROUND_ROBIN, authority)
    assert target("10.0.0.1:8001,10.0.0.2:8001").options == (ROUND_ROBIN,)  # no TLS, no name


def test_the_client_opens_both_channels_on_the_balanced_target(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened: dict[str, Any] = {}

    def triton(url: str, **kwargs: Any) -> Any:
        opened["triton"] = (url, kwargs["channel_args"])
        return FakeTriton(FakeClock())

    def channel(url: str, **kwargs: Any) -> Any:
        opened["raw"] = (url, kwargs["options"])
        return FakeChannel()

    monkeypatch.setattr(abdoserve_client.client.grpcclient, "InferenceServerClient", triton)
    monkeypatch.setattr(abdoserve_client.client, "open_channel", channel)
    with AbdoServeClient(["127.0.0.1:8001", "127.0.0.1:8002"]) as client:
        assert client.url == "127.0.0.1:8001,127.0.0.1:8002"
    url, channel_args = opened["triton"]
    assert url == opened["raw"][0] == "ipv4:127.0.0.1:8001,127.0.0.1:8002"
    assert ROUND_ROBIN in channel_args and ROUND_ROBIN in opened["raw"][1]
    # tritonclient drops its defaults when given channel_args: they are passed on
    assert ("grpc.max_receive_message_length", -1) in channel_args
    assert any(name == "grpc.keepalive_time_ms" for name, _ in channel_args)


class FakeChannel:
    """A grpc channel whose one method records how it is called."""

    def __init__(self) -> None:
        self.kwargs: dict[str, Any] = {}

    def unary_unary(self, method: str, response_deserializer: Any) -> Any:
        def call(request: bytes, **kwargs: Any) -> Any:
            self.kwargs = kwargs
            return service_pb2.ModelInferResponse()

        return call

    def close(self) -> None:
        pass


def test_an_inference_never_waits_for_an_endpoint_to_be_ready() -> None:
    channel = FakeChannel()
    RawInfer(channel).infer(TASK, [bytes_tensor("DICOM", [b"x"])], ["ANSWER"], 2.5)
    assert channel.kwargs == {"timeout": 2.5, "wait_for_ready": False}


# --- the deadline across retries -------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeInfer:
    """The inference transport: each attempt takes `step_s` on the clock, then fails
    with the next of `failures` (or answers); it records the timeout it was given."""

    def __init__(self, clock: FakeClock, failures: list[str], step_s: float) -> None:
        self.clock = clock
        self.failures = list(failures)
        self.step_s = step_s
        self.timeouts: list[float] = []

    def infer(self, task: str, inputs: Any, outputs: Any, timeout_s: float) -> FakeResponse:
        self.timeouts.append(timeout_s)
        self.clock.now += min(self.step_s, timeout_s)
        if self.failures:
            raise triton_error(self.failures.pop(0))
        return FakeResponse()

    def close(self) -> None:
        pass


class FakeTriton:
    """tritonclient's metadata calls, each taking `step_s` on the clock."""

    def __init__(self, clock: FakeClock, step_s: float = 0.0) -> None:
        self.clock = clock
        self.step_s = step_s
        self.timeouts: list[float] = []

    def _take(self, timeout: float) -> None:
        self.timeouts.append(timeout)
        self.clock.now += self.step_s

    def get_model_config(self, task: str, client_timeout: float) -> Any:
        self._take(client_timeout)
        values = parameters(TASK, "regression", ["S", "G0", "G1", "G2"], "stage")
        config = model_config_pb2.ModelConfig(
            parameters={key: model_config_pb2.ModelParameter(string_value=value)
                        for key, value in values.items()}
        )  # fmt: skip
        return service_pb2.ModelConfigResponse(config=config)

    def get_model_metadata(self, task: str, client_timeout: float) -> Any:
        self._take(client_timeout)
        return service_pb2.ModelMetadataResponse(versions=["1"])

    def close(self) -> None:
        pass


def budget_client(
    clock: FakeClock, transport: FakeInfer, *, timeout_s: float, retries: int, backoff_s: float
) -> AbdoServeClient:
    client = AbdoServeClient(
        "127.0.0.1:1,127.0.0.1:2", timeout_s=timeout_s, retries=retries, backoff_s=backoff_s
    )
    client._clock, client._sleep = clock, clock.sleep
    client._transport, client._triton = transport, FakeTriton(clock)
    client._tasks[TASK] = FIBROSIS
    return client


def test_each_attempt_gets_the_time_left_and_no_retry_starts_past_the_deadline() -> None:
    clock = FakeClock()
    transport = FakeInfer(clock, ["UNAVAILABLE"] * 10, step_s=2.0)
    client = budget_client(clock, transport, timeout_s=10.0, retries=5, backoff_s=1.0)
    with pytest.raises(ServerUnavailableError, match=r"after 3 attempts.*10 s deadline") as raised:
        client.infer(TASK, [b"dicom"])
    # t=0 try (2 s), wait 1, t=3 try, wait 2, t=7 try; a 4 s wait would end past t=10
    assert transport.timeouts == pytest.approx([10.0, 7.0, 3.0])
    assert clock.sleeps == pytest.approx([1.0, 2.0])
    assert clock.now - 1000.0 <= 10.0
    assert raised.value.code == "UNAVAILABLE"


def test_a_retry_within_the_deadline_succeeds() -> None:
    clock = FakeClock()
    transport = FakeInfer(clock, ["UNAVAILABLE", "UNAVAILABLE"], step_s=0.5)
    client = budget_client(clock, transport, timeout_s=5.0, retries=3, backoff_s=0.25)
    assert isinstance(client.infer(TASK, [b"dicom"]), FibrosisResult)
    assert transport.timeouts == pytest.approx([5.0, 4.25, 3.25])


def test_an_attempt_that_spends_the_deadline_is_not_retried() -> None:
    clock = FakeClock()
    transport = FakeInfer(clock, ["UNAVAILABLE"], step_s=60.0)
    client = budget_client(clock, transport, timeout_s=3.0, retries=3, backoff_s=0.0)
    with pytest.raises(ServerUnavailableError, match="after 1 attempts"):
        client.infer(TASK, [b"dicom"])
    assert transport.timeouts == [3.0] and clock.sleeps == []


def test_the_first_calls_task_description_fetch_counts_against_the_deadline() -> None:
    clock = FakeClock()
    transport = FakeInfer(clock, [], step_s=0.0)
    client = budget_client(clock, transport, timeout_s=10.0, retries=0, backoff_s=0.0)
    client._tasks.clear()
    client._triton = FakeTriton(clock, step_s=1.5)
    client.infer(TASK, [b"dicom"])
    assert client._triton.timeouts == pytest.approx([10.0, 8.5])
    assert transport.timeouts == pytest.approx([7.0])
    # a fetch that spends it all: the inference is not even sent
    client._tasks.clear()
    client._triton = FakeTriton(clock, step_s=5.0)
    with pytest.raises(DeadlineExceededError, match="10 s deadline is spent"):
        client.infer(TASK, [b"dicom"])
    assert transport.timeouts == pytest.approx([7.0])


def test_the_async_client_keeps_the_same_budget() -> None:
    clock = FakeClock()
    transport = FakeInfer(clock, ["UNAVAILABLE"] * 10, step_s=2.0)

    class AsyncInfer:
        async def infer(self, *args: Any) -> FakeResponse:
            return transport.infer(*args)

        async def close(self) -> None:
            pass

    async def sleep(seconds: float) -> None:
        clock.sleep(seconds)

    async def scenario() -> None:
        async with AsyncAbdoServeClient(
            ["127.0.0.1:1", "127.0.0.1:2"], timeout_s=10.0, retries=5, backoff_s=1.0
        ) as client:
            client._clock, client._sleep, client._raw = clock, sleep, AsyncInfer()
            client._tasks[TASK] = FIBROSIS
            with pytest.raises(ServerUnavailableError, match="after 3 attempts"):
                await client.infer(TASK, [b"dicom"])

    asyncio.run(scenario())
    assert transport.timeouts == pytest.approx([10.0, 7.0, 3.0])
    assert clock.sleeps == pytest.approx([1.0, 2.0])


def test_cli_passes_a_url_list_and_the_tls_server_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made: list[tuple[Any, dict[str, Any]]] = []

    class Recording:
        def __init__(self, url: Any, **kwargs: Any) -> None:
            made.append((url, kwargs))

        def __enter__(self) -> Recording:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def infer(self, *args: Any) -> Any:
            raise ServerUnavailableError("none up")

    monkeypatch.setattr(abdoserve_client.client, "AbdoServeClient", Recording)
    (tmp_path / "1.dcm").write_bytes(b"x")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    urls = ["--url", "gpu1:8001,gpu2:8001", "--tls", "--tls-server-name", "abdoserve.local"]
    assert cli.run(parser.parse_args([TASK, str(tmp_path), *urls])) == 1
    assert made[0][0] == "gpu1:8001,gpu2:8001"
    assert made[0][1]["tls_server_name"] == "abdoserve.local"
    assert "none up" in capsys.readouterr().err
    assert "HOST:PORT,HOST:PORT" in parser.format_help()
    assert "dns:///NAME:PORT" in parser.format_help()
