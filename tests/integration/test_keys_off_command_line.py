"""Triton's API keys never show on a command line (issue 19, item 6).

Triton 2.51 takes its keys only as flags, and any user of the host reads
/proc/PID/cmdline. A real server behind the guard (so with both the admin key and the
guard's inference key) is started as `abdoserve serve` starts it, and looked at as
another user would: no process of its group (tritonserver, its stubs) and none of its
ancestors up to this launcher shows a key, only the placeholders (so the test cannot
pass by finding no command line at all), and the wrappers (`unshare`, `sh`) were given
none either. The keys still hold: the admin APIs and direct inference refuse calls
without them. The key file is gone once the server is ready, the stubs do not load the
library that handed Triton its keys, a restarted server gets them again, and Triton's
log does not print them (log-verbose 0 and 1).
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
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
from abdoserve.deploy.embedded import (
    EmbeddedServer,
    ServerOptions,
    free_ports,
    server_environment,
    triton_command,
)
from abdoserve.deploy.guard import GuardLimits
from abdoserve.deploy.model_control import (
    ADMIN_HEADER,
    GRPC_HEADER_PREFIX,
    GUARD_HEADER,
    ModelControl,
    ModelControlError,
)
from abdoserve.deploy.supervisor import Supervisor, SupervisorOptions
from abdoserve.deploy.triton_keys import KEY_FILE_VARIABLE, library, placeholder
from abdoserve.export.configs import Tuning
from abdoserve.export.phantom import build_study
from abdoserve_client import AbdoServeClient
from abdoserve_client.errors import AbdoServeError

TASK = "bone_density_ct"
TUNING = Tuning(preprocess_instances=1, net_instances=1, net_intra_op_threads=1)
STUBS = 2  # one instance each of the task's fused model (`serve`'s default) and explain model
WAIT_S = 180.0


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


def cmdline(pid: int) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def process_group(group: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group:  # the 5th field of proc(5): pgrp
            found.append(int(entry.name))
    return found


def ancestors(pid: int) -> list[int]:
    """From `pid`'s parent up to this launcher (the process that started it)."""
    found = []
    parent = stubs.parent_of(pid)
    while parent is not None and parent > 1:
        found.append(parent)
        if parent == os.getpid():
            break
        parent = stubs.parent_of(parent)
    assert os.getpid() in found, "the server was not started by this launcher?"
    return found


def http_status(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=b"{}", method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from abdoserve.export.repository import build_repository

    out = tmp_path_factory.mktemp("keys-repository") / "model_repository"
    build_repository(out, (TASK,), tuning=TUNING)
    return out


@pytest.fixture(scope="module")
def guarded(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    """As `abdoserve serve` runs: Triton behind the guard, on a private /dev/shm."""
    options = ServerOptions(
        repository=repository,
        ports=free_ports(),
        log_file=tmp_path_factory.mktemp("keys") / "triton.log",
    )
    supervision = SupervisorOptions(
        health_port=None, guard=GuardLimits(max_body_bytes=257 * 1024 * 1024)
    )
    with Supervisor(options, supervision) as running:
        yield running


def server_of(supervisor: Supervisor) -> tuple[EmbeddedServer, int]:
    server = supervisor.server
    assert server is not None and server.process is not None
    return server, server.process.pid


def keys_of(server: EmbeddedServer) -> list[bytes]:
    keys = [server.options.admin_key, server.options.inference_key]
    assert all(keys), "behind the guard, Triton has both keys"
    return [str(key).encode() for key in keys]


def assert_no_key_on_any_command_line(server: EmbeddedServer, pid: int) -> None:
    keys = keys_of(server)
    # What the wrappers were given before each exec'd the next (unshare, sh, tritonserver).
    assert server.process is not None and isinstance(server.process.args, list)
    launched = "\0".join(map(str, server.process.args)).encode()
    assert not [key for key in keys if key in launched], "a key given to the wrappers"
    group = process_group(pid)
    assert len(group) >= 1 + STUBS, "the stubs are in the server's process group"
    for each in {*group, *ancestors(pid)}:
        seen = cmdline(each)
        assert not [key for key in keys if key in seen], f"a key in /proc/{each}/cmdline"
    # Not vacuous: the command lines read are the server's, placeholders in place.
    assert b"unshare" in launched and placeholder("admin").encode() in launched
    triton = cmdline(pid)
    assert triton.split(b"\0")[0].endswith(b"tritonserver")
    for name in ("admin", "inference"):
        assert placeholder(name).encode() in triton


def test_no_command_line_shows_a_key(guarded: Supervisor) -> None:
    assert_no_key_on_any_command_line(*server_of(guarded))


@pytest.mark.skipif(os.geteuid() != 0, reason="runuser needs root")
@pytest.mark.skipif(shutil.which("runuser") is None, reason="runuser is not installed")
def test_another_user_reads_placeholders_and_no_key(guarded: Supervisor) -> None:
    server, pid = server_of(guarded)
    seen = {
        each: subprocess.run(
            ["runuser", "-u", "nobody", "--", "cat", f"/proc/{each}/cmdline"],
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout
        for each in [pid, *stubs.stubs_of(pid)]
    }
    for each, text in seen.items():
        assert not [key for key in keys_of(server) if key in text], f"/proc/{each}/cmdline"
    assert placeholder("admin").encode() in seen[pid], "nobody reads the placeholders"


def test_the_admin_apis_still_need_the_admin_key(guarded: Supervisor) -> None:
    server, _ = server_of(guarded)
    base, key = server.url(""), server.options.admin_key
    for wrong in ("guess", placeholder("admin")):  # the placeholder itself is no key
        with pytest.raises(ModelControlError, match="HTTP 403"):
            ModelControl(base, wrong).model_names()
    assert TASK in ModelControl(base, key).model_names()
    # gRPC, as the restricted protocol's metadata
    with grpcclient.InferenceServerClient(f"127.0.0.1:{server.ports.grpc}") as triton:
        with pytest.raises(InferenceServerException, match="restricted"):
            triton.get_model_repository_index()
        opened = {GRPC_HEADER_PREFIX + ADMIN_HEADER: key}
        assert triton.get_model_repository_index(headers=opened).models


def test_inference_straight_to_triton_still_needs_the_guards_key(guarded: Supervisor) -> None:
    server, _ = server_of(guarded)
    infer = server.url(f"/v2/models/{TASK}/infer")
    assert http_status(infer, {}) == 403
    assert http_status(infer, {GUARD_HEADER: placeholder("inference")}) == 403
    # With the key Triton takes the call (and then finds "{}" no inference request).
    assert http_status(infer, {GUARD_HEADER: str(server.options.inference_key)}) in (400, 500)
    with (
        AbdoServeClient(f"127.0.0.1:{server.ports.grpc}", retries=0) as direct,
        pytest.raises(AbdoServeError, match="restricted"),
    ):
        direct.bone_density_ct(build_study(TASK, seed=4).instances)
    public = f"{guarded.public_host}:{guarded.public_ports.grpc}"
    with AbdoServeClient(public, timeout_s=60) as client:  # the guard adds the key
        assert client.bone_density_ct(build_study(TASK, seed=4).instances).study_values.shape


def assert_key_file_gone(server: EmbeddedServer) -> None:
    folder = server.options.log_file.parent / "triton-keys"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert list(folder.iterdir()) == []


def test_the_key_file_is_gone_once_the_server_is_ready(guarded: Supervisor) -> None:
    assert_key_file_gone(server_of(guarded)[0])


def test_the_library_is_in_tritonserver_and_not_in_its_stubs(guarded: Supervisor) -> None:
    _, pid = server_of(guarded)
    preload = str(library()).encode()
    assert preload in (Path("/proc") / str(pid) / "maps").read_bytes()  # not vacuous
    found = stubs.stubs_of(pid)
    assert len(found) == STUBS
    for stub in found:
        environ = (Path("/proc") / str(stub) / "environ").read_bytes().split(b"\0")
        assert not [item for item in environ if item.startswith(b"LD_PRELOAD=")]
        assert not [item for item in environ if item.startswith(KEY_FILE_VARIABLE.encode())]
        assert preload not in (Path("/proc") / str(stub) / "maps").read_bytes()


def test_a_restarted_server_gets_its_keys_by_file_again(guarded: Supervisor) -> None:
    _, old = server_of(guarded)
    os.kill(old, signal.SIGKILL)

    def restarted() -> bool:
        server = guarded.server
        process = None if server is None else server.process
        return process is not None and process.pid != old and guarded.is_ready()

    wait_until(restarted, "the restarted server")
    server, pid = server_of(guarded)
    assert_no_key_on_any_command_line(server, pid)
    assert_key_file_gone(server)
    assert ModelControl(server.url(""), server.options.admin_key).model_names()


def test_tritons_log_shows_no_key(guarded: Supervisor) -> None:
    """At log-verbose 0 (the guarded server's log, startup, calls and a restart in it)."""
    server, _ = server_of(guarded)
    text = server.options.log_file.read_bytes()
    assert b"Started GRPCInferenceService" in text
    assert not [key for key in keys_of(server) if key in text]


def test_tritons_verbose_log_shows_no_key(repository: Path, tmp_path: Path) -> None:
    """At log-verbose 1, with calls carrying each key."""
    admin, inference = "admin-" + os.urandom(12).hex(), "guard-" + os.urandom(12).hex()
    options = ServerOptions(
        repository=repository,
        ports=free_ports(),
        log_file=tmp_path / "triton.log",
        log_verbose=1,
        admin_key=admin,
        inference_key=inference,
    )
    with EmbeddedServer(options) as server:
        assert ModelControl(server.url(""), admin).model_names()
        infer = server.url(f"/v2/models/{TASK}/infer")
        assert http_status(infer, {GUARD_HEADER: inference}) in (400, 500)
        assert http_status(infer, {GUARD_HEADER: "guess"}) == 403
    text = options.log_file.read_text(errors="replace")
    assert "Started GRPCInferenceService" in text and len(text.splitlines()) > 100
    assert admin not in text and inference not in text


def test_without_the_library_tritonserver_refuses_to_start(
    repository: Path, tmp_path: Path
) -> None:
    """Should ld.so not preload the library (it only warns), Triton would take the
    placeholders as its keys, which every user can read: `--exit-on-error=<placeholder>`
    makes it refuse to start instead."""
    options = ServerOptions(repository=repository, ports=free_ports(), log_file=tmp_path / "t")
    refused = subprocess.run(
        triton_command(options),
        env=server_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode != 0
    assert f"invalid value for bool option: {placeholder('loaded')}" in refused.stdout
    assert "Started GRPCInferenceService" not in refused.stdout
