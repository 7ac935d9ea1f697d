"""`abdoserve serve` as a test starts it: a child process whose output is kept, ready
once it prints "AbdoServe ready", stopped with Ctrl-C's signal and expected to exit 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

ABDOSERVE = str(Path(sys.executable).parent / "abdoserve")
READY = "AbdoServe ready"


def free_ports() -> dict[str, int]:
    from abdoserve.deploy.embedded import free_port

    return {name: free_port() for name in ("grpc", "http", "metrics", "health")}


def small_serve(repository: Path, ports: Mapping[str, int], log_folder: Path) -> list[str]:
    """`serve`'s arguments for a test: its ports, its log, one instance of each model."""
    return [
        f"--repository={repository}",
        f"--grpc-port={ports['grpc']}",
        f"--http-port={ports['http']}",
        f"--metrics-port={ports['metrics']}",
        f"--supervisor-port={ports['health']}",
        f"--log-file={log_folder / 'triton.log'}",
        "--preprocess-instances=1",
        "--net-instances=1",
        "--net-threads=1",
    ]


def start_serve(
    arguments: Sequence[str],
    output: list[str],
    *,
    wait_s: float,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[str]:
    """`abdoserve serve ARGUMENTS`, its lines appended to `output`; returns once it is
    ready (or has exited, which the caller's assertion shows with the output)."""
    process = subprocess.Popen(
        [ABDOSERVE, "serve", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env=None if env is None else dict(env),
    )
    ready = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if line.startswith(READY):
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(wait_s)
    assert process.poll() is None, "".join(output)
    return process


def stop_serve(process: subprocess.Popen[str], output: list[str]) -> None:
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=180) == 0, "".join(output)
