"""Short headless locust runs against the real server (session fixture): the mixed
hospital-day scenario, then the bad-payload scenario."""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path

import pytest

from abdoserve.export.phantom import TASK_NAMES
from abdoserve.loadtests import cli
from abdoserve.loadtests.payloads import BAD_PAYLOAD_PREFIX
from abdoserve.loadtests.slo import AGGREGATED, Budget, read_stats
from abdoserve_client.client import AbdoServeClient

# locust must be gone this long after --run-time (start-up ~1 s, CSV settle ~1.2 s);
# `execute` kills it and raises subprocess.TimeoutExpired otherwise.
EXIT_MARGIN_S = 30.0
LOCUST_REPORTS_FAILURES = 1  # locust's exit status when any request failed (--exit-code-on-error)


@dataclass(frozen=True)
class Run:
    out: Path
    exit_code: int


def run_scenario(grpc_url: str, out: Path, *argv: str) -> Run:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args([*argv, "--host", grpc_url, "--out", str(out)])
    return Run(out, cli.execute(args, out, margin_s=EXIT_MARGIN_S))


@pytest.fixture(scope="module")
def mixed(grpc_url: str, tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("hospital_day")
    return run_scenario(
        grpc_url, out, "hospital_day", "--users", "5", "--spawn-rate", "5", "--run-time", "15s"
    )


@pytest.fixture(scope="module")
def bad(grpc_url: str, tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("bad_payload")
    return run_scenario(
        grpc_url, out, "bad_payload", "--users", "2", "--spawn-rate", "2", "--run-time", "6s"
    )


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_mixed_run_exits_on_time_without_failures(mixed: Run) -> None:
    assert mixed.exit_code == 0  # returned within --run-time + margin, no failure
    rows = read_stats(mixed.out / "stats_stats.csv")
    assert {row.name for row in rows} == {*TASK_NAMES, AGGREGATED}
    assert all(row.failures == 0 and row.requests > 0 for row in rows)
    assert csv_rows(mixed.out / "stats_exceptions.csv") == []


def test_slo_gate_passes_a_loose_budget_and_fails_an_impossible_one(
    mixed: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    loose = Budget(0.0, p95_ms={"*": 60_000}, p99_ms={"*": 60_000})
    assert cli.judge(mixed.out, loose) == cli.EXIT_OK
    assert cli.judge(mixed.out, Budget(0.0, p95_ms={"*": 1})) == cli.EXIT_SLO
    assert "SLO gate: FAIL" in capsys.readouterr().out
    assert (mixed.out / "latency.png").read_bytes().startswith(b"\x89PNG")
    assert (mixed.out / "report.html").stat().st_size > 0


def test_bad_payloads_fail_with_their_grpc_code(bad: Run, grpc_url: str) -> None:
    assert bad.exit_code == LOCUST_REPORTS_FAILURES  # a normal exit, failures reported
    failures = csv_rows(bad.out / "stats_failures.csv")
    names = {f"{BAD_PAYLOAD_PREFIX}not_dicom", f"{BAD_PAYLOAD_PREFIX}truncated"}
    assert {row["Name"] for row in failures} == names
    assert all("INVALID_ARGUMENT" in row["Error"] for row in failures)
    assert csv_rows(bad.out / "stats_exceptions.csv") == []  # the load generator never crashed
    stats = read_stats(bad.out / "stats_stats.csv")
    assert all(row.requests > 0 and row.failures == row.requests for row in stats)
    with AbdoServeClient(grpc_url, timeout_s=10) as client:
        assert client.is_ready()
