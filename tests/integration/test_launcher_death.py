"""A launcher that dies leaves nothing behind, and one that cannot have its ports refuses
before it starts anything (issue 19).

Every deployment path: `abdoserve serve`, `abdoserve serve --replicas 2` and the
container's entrypoint (`python -m abdoserve.deploy.container`). SIGKILL of the launcher
must take down every process it started (tritonserver, its stubs, nginx's master and
workers, the replicas) and free its public ports: an orphaned nginx worker once held
all four and made the next `serve` print ready on a stack it did not own. A port that
another process holds is refused by name with exit status 2, before any child starts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from abdoserve.deploy.embedded import free_port, server_environment, triton_home
from abdoserve.export.configs import Tuning

WAIT_S = 600.0  # every model of every replica loads and warms up on two shared cores
GONE_S = 120.0  # a replica drains (2 s) and its Triton stops in order (SIGTERM from us)
STUB = "triton_python_b"  # the kernel keeps 15 characters of a command's name
KINDS = ("serve", "replicas", "container")
TASK = "bone_density_ct"  # one task: 3 stubs a server, enough to be left behind
TUNING = Tuning(preprocess_instances=1, net_instances=1, net_intra_op_threads=1)
TUNING_FLAGS = ["--preprocess-instances=1", "--net-instances=1", "--net-threads=1"]


@dataclass(frozen=True)
class Proc:
    """A process as /proc tells it: its start time tells a reused pid apart."""

    pid: int
    name: str
    state: str
    parent: int
    started: int


def read_proc(pid: int) -> Proc | None:
    try:
        text = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()  # from the 3rd field of proc(5): state
    return Proc(pid, name, fields[0], int(fields[1]), int(fields[19]))


def descendants(root: int) -> list[Proc]:
    table = [
        read_proc(int(entry.name)) for entry in Path("/proc").iterdir() if entry.name.isdigit()
    ]
    found: list[Proc] = []
    parents = {root}
    while parents:
        children = [proc for proc in table if proc is not None and proc.parent in parents]
        found += children
        parents = {proc.pid for proc in children}
    return found


def alive(proc: Proc) -> bool:
    """Still running as the same process (a zombie holds no port and no memory)."""
    now = read_proc(proc.pid)
    return now is not None and now.started == proc.started and now.state not in ("Z", "X")


def bindable(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def free_base_port() -> int:
    """A free port whose + 10 is free too (replica 2's metrics and health ports)."""
    while True:
        port = free_port()
        if port + 10 < 65536 and bindable(port + 10):
            return port


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (urllib.error.URLError, OSError):
        return 0


@dataclass(frozen=True)
class Ports:
    grpc: int
    http: int
    metrics: int
    supervisor: int

    def flags(self) -> list[str]:
        return [
            f"--grpc-port={self.grpc}",
            f"--http-port={self.http}",
            f"--metrics-port={self.metrics}",
            f"--supervisor-port={self.supervisor}",
        ]

    def public(self, kind: str) -> list[int]:
        ports = [self.grpc, self.http, self.metrics, self.supervisor]
        return ports + ([self.metrics + 10, self.supervisor + 10] if kind == "replicas" else [])


def fresh_ports() -> Ports:
    return Ports(free_base_port(), free_port(), free_base_port(), free_base_port())


def launch(kind: str, repository: Path, folder: Path, ports: Ports) -> subprocess.Popen[bytes]:
    """The launcher of `kind` on `ports`, every log under `folder`, the guard on."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "container":
        (folder / "bin").mkdir()
        (folder / "bin" / "tritonserver").symlink_to(triton_home() / "bin" / "tritonserver")
        base = server_environment()
        env = base | {
            "PATH": f"{folder / 'bin'}{os.pathsep}{base['PATH']}",
            "MODEL_REPOSITORY": str(repository),
            "ABDOSERVE_LOG_DIR": str(folder / "logs"),
        }
        command = [sys.executable, "-m", "abdoserve.deploy.container", *ports.flags()]
    else:
        env = dict(os.environ)
        command = [
            str(Path(sys.executable).parent / "abdoserve"),
            "serve",
            f"--repository={repository}",
            f"--log-file={folder / 'logs' / 'triton.log'}",
            "--guard=on",
            *TUNING_FLAGS,
            *ports.flags(),
            *(["--replicas=2"] if kind == "replicas" else []),
        ]
    # Into a file, not a pipe: an orphan that inherited a pipe would keep it open, and
    # reading the launcher's output to its end would wait for that orphan.
    with (folder / "launcher.out").open("w") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)


def wait_ready(process: subprocess.Popen[bytes], ports: Ports) -> None:
    """The supervisor's /health/ready (replica 1's behind the balancer) answers 200."""
    deadline = time.monotonic() + WAIT_S
    ready = f"http://127.0.0.1:{ports.supervisor}/health/ready"
    while http_status(ready) != 200:
        assert process.poll() is None, "the launcher exited while starting"
        assert time.monotonic() < deadline, "the launcher was not ready in time"
        time.sleep(0.5)


def wait_gone(started: list[Proc]) -> list[Proc]:
    """What of `started` is still running once it is all gone or GONE_S passed."""
    deadline = time.monotonic() + GONE_S
    while (left := [proc for proc in started if alive(proc)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built for TUNING, as `serve` with TUNING_FLAGS (and --replicas 2) expects it."""
    from abdoserve.export.repository import build_repository

    out = tmp_path_factory.mktemp("launcher") / "model_repository"
    build_repository(out, (TASK,), tuning=TUNING)
    return out


@pytest.fixture
def kill_leftovers() -> Iterator[list[Proc]]:
    """Whatever a failed test left running (ours: recorded before the kill) is killed,
    and the regions its stubs left in the host's /dev/shm removed."""
    recorded: list[Proc] = []
    yield recorded
    for proc in recorded:
        if alive(proc):
            os.kill(proc.pid, signal.SIGKILL)
    for region in host_regions([proc.pid for proc in recorded]):
        region.unlink(missing_ok=True)


@pytest.mark.parametrize("kind", KINDS)
def test_a_sigkilled_launcher_leaves_no_process_and_frees_its_ports(
    kind: str, repository: Path, tmp_path: Path, kill_leftovers: list[Proc]
) -> None:
    ports = fresh_ports()
    launcher = launch(kind, repository, tmp_path, ports)
    try:
        kill_leftovers += [proc for proc in [read_proc(launcher.pid)] if proc is not None]
        wait_ready(launcher, ports)
        started = descendants(launcher.pid)
        kill_leftovers += started
    finally:
        launcher.kill()  # SIGKILL: no handler, no `finally` of its own runs
        launcher.wait()
    names = [proc.name for proc in started]
    servers = 2 if kind == "replicas" else 1
    # What there was to leave behind: servers, their stubs, nginx's master and worker.
    assert names.count("tritonserver") == servers, names
    assert names.count(STUB) >= 2 * servers, names  # the fused model and its explain model
    assert names.count("nginx") == 2, names
    left = wait_gone(started)
    assert not left, f"{len(left)} processes outlived the launcher: {left}"
    taken = [port for port in ports.public(kind) if not bindable(port)]
    assert not taken, f"ports still held after the launcher died: {taken}"
    regions = host_regions([launcher.pid, *(proc.pid for proc in started)])
    # The pod's /dev/shm is its own (shm isolation "host" in the image) and goes with
    # it; here it is the host's: kill_leftovers removes what the killed stubs left there.
    if kind != "container":
        assert not regions, "regions outlived the launcher's private /dev/shm"


def host_regions(pids: list[int]) -> list[Path]:
    """The Python backend's regions of these launches in the host's /dev/shm."""
    return [path for pid in pids for path in Path("/dev/shm").glob(f"abdoserve_shm_{pid}_*")]


def launch_refused(kind: str, repository: Path, folder: Path, ports: Ports) -> str:
    """The launcher's output; it must exit by itself, status 2."""
    launcher = launch(kind, repository, folder, ports)
    try:
        code = launcher.wait(timeout=WAIT_S)
    finally:
        launcher.kill()
    output = (folder / "launcher.out").read_text()
    assert code == 2, output
    return output


@pytest.mark.parametrize(
    ("kind", "held", "name"),
    [
        ("serve", "grpc", "gRPC"),
        ("serve", "http", "HTTP"),
        ("serve", "metrics", "metrics"),
        ("serve", "supervisor", "supervisor"),
        ("replicas", "grpc", "gRPC"),
        ("replicas", "supervisor", "replica 1's supervisor"),
        ("container", "grpc", "gRPC"),
        ("container", "metrics", "metrics"),
    ],
)
def test_a_taken_port_is_refused_by_name_before_anything_starts(
    kind: str, held: str, name: str, repository: Path, tmp_path: Path
) -> None:
    ports = fresh_ports()
    port = getattr(ports, held)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        output = launch_refused(kind, repository, tmp_path, ports)
    assert f"port {port} ({name}) is already in use" in output, output
    assert "AbdoServe ready" not in output, output
    # Nothing started: no server wrote a log, no nginx a configuration.
    assert not list(tmp_path.rglob("triton.log")), output
    assert not list(tmp_path.rglob("nginx.conf")), output
