"""`abdoserve serve`'s security options: what they turn into, and what they refuse."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from abdoserve.deploy import serve
from abdoserve.deploy.embedded import ServerOptions
from abdoserve.deploy.guard import GuardError
from abdoserve.deploy.isolation import IsolationError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(list(argv))


def key_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        *[("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True)],
        *[("0.0.0.0", False), ("10.1.2.3", False), ("::", False), ("pacs.hospital", False)],
    ],
)
def test_only_loopback_addresses_count_as_loopback(host: str, loopback: bool) -> None:
    assert serve.is_loopback(host) is loopback


def test_beyond_loopback_without_tls_a_warning_is_printed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = parse("--host", "0.0.0.0", "--guard", "off")
    serve.warn_if_exposed(args, serve.supervisor_options(args))
    assert "warning: listening on 0.0.0.0 without TLS" in capsys.readouterr().out
    serve.warn_if_exposed(
        parse("--guard", "off"), serve.supervisor_options(parse("--guard", "off"))
    )
    assert capsys.readouterr().out == ""


def test_tls_needs_both_files_and_files_that_exist(tmp_path: Path) -> None:
    certificate = key_file(tmp_path / "server.pem", "x")
    with pytest.raises(GuardError, match="both"):
        serve.tls_files(parse("--tls-cert", str(certificate)))
    with pytest.raises(GuardError, match="does not exist"):
        serve.tls_files(parse("--tls-cert", str(certificate), "--tls-key", str(tmp_path / "no")))
    with pytest.raises(GuardError, match="needs --tls-cert"):
        serve.tls_files(parse("--tls-client-ca", str(certificate)))
    assert serve.tls_files(parse()) is None


def test_tls_with_the_guard_off_is_refused(tmp_path: Path) -> None:
    pem = key_file(tmp_path / "server.pem", "x")
    args = parse("--guard", "off", "--tls-cert", str(pem), "--tls-key", str(pem))
    supervision = serve.supervisor_options(args)
    with pytest.raises(GuardError, match="TLS is served by the guard"):
        serve.Supervisor(serve.server_options(args), supervision)


def test_keys_come_from_files_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(serve.ADMIN_KEY_VARIABLE, "from-env")
    assert serve.read_key(None, serve.ADMIN_KEY_VARIABLE) == "from-env"
    private = key_file(tmp_path / "admin.key", "from-file\n")
    assert serve.read_key(private, serve.ADMIN_KEY_VARIABLE) == "from-file"
    assert capsys.readouterr().out == ""
    shared = key_file(tmp_path / "shared.key", "readable", mode=0o644)
    assert serve.read_key(shared, serve.ADMIN_KEY_VARIABLE) == "readable"
    assert "readable by other users" in capsys.readouterr().out
    with pytest.raises(OSError, match="empty"):
        serve.read_key(key_file(tmp_path / "empty.key", "\n"), serve.ADMIN_KEY_VARIABLE)


def test_a_shared_region_needs_its_own_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(serve.SHM_KEY_VARIABLE, raising=False)
    with pytest.raises(IsolationError, match="shared-memory key"):
        serve.server_options(parse("--shm-isolation", "host", "--shared-region", "x"))


def test_the_shared_memory_key_moves_shared_memory_out_of_the_admin_group() -> None:
    from abdoserve.deploy.embedded import control_args, triton_key_values
    from abdoserve.deploy.triton_keys import resolve

    def resolved(options: ServerOptions) -> list[str]:
        """As Triton sees them: the keys in place of their placeholders."""
        return [resolve(arg, triton_key_values(options)) for arg in control_args(options)]

    closed = resolved(ServerOptions(Path("/r"), admin_key="A"))
    admin = "model-repository,statistics,trace,logging"
    assert f"--grpc-restricted-protocol={admin},shared-memory:abdoserve-admin-key=A" in closed
    args = resolved(ServerOptions(Path("/r"), admin_key="A", shm_key="S"))
    assert "--http-restricted-api=shared-memory:abdoserve-shm-key=S" in args
    assert f"--http-restricted-api={admin}:abdoserve-admin-key=A" in args


def test_the_canary_and_drift_bounds_reach_every_deployment_path(tmp_path: Path) -> None:
    """One host, each replica of `--replicas` (through its options file) and the pod's
    entrypoint read the same flags into the same supervisor options."""
    from dataclasses import asdict

    from abdoserve.deploy import container
    from abdoserve.deploy.replicas import ReplicaOptions

    flags = ["--drift-window-s=600", "--drift-min-studies=25", "--rollback-window-s=45"]
    one_host = serve.supervisor_options(parse(*flags))
    assert (one_host.drift.window_s, one_host.drift.min_studies) == (600.0, 25)
    assert one_host.rollback.window_s == 45.0
    pod_args, _ = container.parse(flags)
    pod = container.supervisor_options(pod_args)
    assert (pod.drift, pod.rollback) == (one_host.drift, one_host.rollback)
    replica = ReplicaOptions(
        index=1,
        repository=str(tmp_path),
        log_file=str(tmp_path / "log"),
        grpc_port=1,
        http_port=2,
        metrics_port=3,
        health_port=4,
        admin_key="a",
        inference_key="b",
        rollback=asdict(one_host.rollback),
        drift=asdict(one_host.drift),
    )
    again = ReplicaOptions.read(replica.write(tmp_path / "options.json")).supervisor_options()
    assert (again.drift, again.rollback) == (one_host.drift, one_host.rollback)
