"""`abdoserve gateway` as a real process for the tests: start, kill, restart, read metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from prometheus_client.parser import text_string_to_metric_families

from abdoserve.deploy.embedded import free_port

WAIT_S = 120.0
AE_TITLE = "ABDOSERVE"


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


@dataclass(eq=False)
class GatewayProcess:
    """One gateway on free ports with its spool in `folder`; same ports across restarts."""

    folder: Path
    rules: Path
    grpc_url: str
    destinations: Sequence[str]
    quiet_s: float = 1.0
    extra: Sequence[str] = ()
    # The maps and key images beside each SR: off unless a test is about them
    # (test_gateway_viewer_objects.py), so the SR tests count reports alone.
    explanation_maps: bool = False
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _log: IO[bytes] | None = field(default=None, init=False)

    @property
    def spool(self) -> Path:
        return self.folder / "spool"

    @property
    def log_file(self) -> Path:
        return self.folder / "gateway.log"

    def command(self) -> list[str]:
        command = [
            sys.executable,
            "-m",
            "abdoserve.deploy.cli",
            "gateway",
            "--rules",
            str(self.rules),
            "--spool",
            str(self.spool),
            "--port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
            "--quiet-s",
            str(self.quiet_s),
            "--url",
            self.grpc_url,
            "--timeout",
            "10",
            # the tests' studies are small: a CI disk with little free space still takes them
            "--min-free-mib",
            "64",
        ]
        for destination in self.destinations:
            command += ["--destination", destination]
        if not self.explanation_maps:
            command.append("--no-explanation-maps")
        return [*command, *self.extra]

    def start(self) -> GatewayProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_file, "ab")  # noqa: SIM115 - kept open while it runs
        self.process = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=os.environ.copy()
        )
        wait_until(self._listening, "the gateway's metrics endpoint")
        return self

    def _listening(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the gateway exited: {self.log_text()[-3000:]}")
        try:
            self.metrics_text()
        except OSError:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL: no chance to tidy up (a power cut, the OOM killer)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self._close_log()

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            self._close_log()
            return 0 if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        self._close_log()
        return code

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def metrics_text(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text: str = response.read().decode()
            return text

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value (0 when absent)."""
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0
