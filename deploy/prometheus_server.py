"""A real Prometheus (Debian's `prometheus` package) for tests and development.

`PrometheusServer` writes a config that scrapes the given Triton metrics targets
with the project's rule files loaded, starts `prometheus` on a local port with
its data in a given folder, waits until it is ready, answers PromQL queries
through the HTTP API, and stops it cleanly.

Development: `python -m abdoserve.deploy.prometheus_server --target 127.0.0.1:8002`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from abdoserve.deploy import processes

PROMETHEUS_DIR = Path(__file__).resolve().parent / "prometheus"
RULE_FILES = (str(PROMETHEUS_DIR / "rules" / "*.yml"),)
JOB = "abdoserve-triton"
SUPERVISOR_JOB = "abdoserve-supervisor"
GATEWAY_JOB = "abdoserve-gateway"


class PrometheusError(RuntimeError):
    """Prometheus could not be started, or a query failed."""


@dataclass(frozen=True)
class Sample:
    labels: dict[str, str]
    value: float


def render_config(
    targets: Sequence[str],
    *,
    interval_s: float = 15.0,
    rule_files: Sequence[str] = RULE_FILES,
    target_labels: Mapping[str, Mapping[str, str]] | None = None,
    supervisor_targets: Sequence[str] = (),
    gateway_targets: Sequence[str] = (),
) -> str:
    """The config as text: JSON, which is valid YAML, so no YAML library is needed.
    `target_labels` gives a target labels of its own (e.g. `pod` per local replica)."""
    interval = f"{int(interval_s * 1000)}ms"
    labels = target_labels or {}
    groups = [
        {"targets": [target], "labels": dict(labels[target])}
        if target in labels
        else {"targets": [target]}
        for target in targets
    ]
    jobs: list[dict[str, object]] = [{"job_name": JOB, "static_configs": groups}]
    if supervisor_targets:
        supervisors = {"targets": list(supervisor_targets)}
        jobs.append({"job_name": SUPERVISOR_JOB, "static_configs": [supervisors]})
    if gateway_targets:
        gateways = {"targets": list(gateway_targets)}
        jobs.append({"job_name": GATEWAY_JOB, "static_configs": [gateways]})
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": list(rule_files),
        "scrape_configs": jobs,
    }
    return json.dumps(config, indent=2) + "\n"


def binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise PrometheusError("prometheus is not installed: run `make install` (Debian package)")
    return found


class PrometheusServer:
    """A running `prometheus` process on 127.0.0.1:`port`; use as a context manager."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        port: int,
        data_dir: Path,
        interval_s: float = 15.0,
        startup_timeout_s: float = 30.0,
        target_labels: Mapping[str, Mapping[str, str]] | None = None,
        gateway_targets: Sequence[str] = (),
        supervisor_targets: Sequence[str] = (),
    ) -> None:
        self.port = port
        self.data_dir = data_dir
        self.config = data_dir / "prometheus.yml"
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            render_config(
                targets,
                interval_s=interval_s,
                target_labels=target_labels,
                gateway_targets=gateway_targets,
                supervisor_targets=supervisor_targets,
            )
        )
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "prometheus.log"

    def command(self) -> list[str]:
        return [
            binary(),
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.data_dir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]

    def start(self) -> None:
        self._log = self.log_file.open("wb")
        self.process = processes.start(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:  # stopped here if it never comes ready (or on Ctrl-C meanwhile)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.is_ready():
            if self.process.poll() is not None:
                raise PrometheusError(f"prometheus exited early; see {self.log_file}")
            if time.monotonic() > deadline:
                raise PrometheusError(f"prometheus not ready in {self.startup_timeout_s} s")
            time.sleep(0.1)

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:  # refused, reset or timed out while it starts
            return False

    def stop(self) -> None:
        process, self.process = self.process, None
        processes.stop(process, grace_s=15)  # SIGTERM flushes the head block and exits
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def api(self, path: str, **params: str) -> Any:
        """The `data` of a successful HTTP API answer (e.g. path "query", "labels")."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            raise PrometheusError(f"{path} {params}: {error.read().decode()}") from error
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[Sample]:
        """An instant query's vector result."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr!r} gave a {data['resultType']}, not a vector")
        return [Sample(item["metric"], float(item["value"][1])) for item in data["result"]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--target", action="append", default=[], help="host:metrics-port")
    parser.add_argument("--port", type=int, default=9090, help="web UI port (default 9090)")
    parser.add_argument("--interval-s", type=float, default=15.0, help="scrape interval")
    args = parser.parse_args(argv)
    targets = args.target or ["127.0.0.1:8002"]
    with tempfile.TemporaryDirectory(prefix="abdoserve-prometheus-") as data:
        server = PrometheusServer(
            targets, port=args.port, data_dir=Path(data), interval_s=args.interval_s
        )
        with server, contextlib.suppress(KeyboardInterrupt):
            print(f"Prometheus at {server.url}, scraping {', '.join(targets)}; Ctrl-C stops it.")
            while server.process is not None and server.process.poll() is None:
                time.sleep(1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
