"""The load-test package without a server and without importing locust (which would
monkey-patch this test process): SLO gate, plot, CLI parsing, shapes, one call."""

from __future__ import annotations

import argparse
import csv
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tritonclient.utils import InferenceServerException

from abdoserve.loadtests import cli
from abdoserve.loadtests.connection import connection, options_from_environment, split_host
from abdoserve.loadtests.grpc_call import timed_infer
from abdoserve.loadtests.payloads import BAD_PAYLOAD_PREFIX, Payload, payload_pool
from abdoserve.loadtests.plot import plot_history, read_history
from abdoserve.loadtests.profiles import spike_users, step_users
from abdoserve.loadtests.slo import Budget, evaluate, gate, read_stats
from abdoserve_client.errors import DeadlineExceededError, InvalidRequestError, from_triton

STATS_HEADER = [
    "Type",
    "Name",
    "Request Count",
    "Failure Count",
    "Median Response Time",
    "Average Response Time",
    "Min Response Time",
    "Max Response Time",
    "Average Content Size",
    "Requests/s",
    "Failures/s",
    "50%",
    "66%",
    "75%",
    "80%",
    "90%",
    "95%",
    "98%",
    "99%",
    "99.9%",
    "99.99%",
    "100%",
]
HISTORY_HEADER = [
    "Timestamp",
    "User Count",
    "Type",
    "Name",
    "Requests/s",
    "Failures/s",
    "50%",
    "66%",
    "75%",
    "80%",
    "90%",
    "95%",
    "98%",
    "99%",
    "99.9%",
    "99.99%",
    "100%",
    "Total Request Count",
    "Total Failure Count",
    "Total Median Response Time",
    "Total Average Response Time",
    "Total Min Response Time",
    "Total Max Response Time",
    "Total Average Content Size",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def stats_row(name: str, requests: int, failures: int, p95: str, p99: str) -> list[str]:
    """A stats row; only the counts, 95% and 99% matter to the gate."""
    kind = "" if name == "Aggregated" else "grpc"
    counts = [kind, name, str(requests), str(failures)]
    times = ["40", "50.5", "10", "900", "980", "3.1", "0", "40", "45", "50", "55", "70"]
    return [*counts, *times, p95, "150", p99, "300", "300", "300"]


def write_stats(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(STATS_HEADER)
        writer.writerows(rows)
    return path


@pytest.fixture
def stats_csv(tmp_path: Path) -> Path:
    rows = [
        stats_row("bone_density_ct", 100, 0, "120", "200"),
        stats_row("liver_mass_ct", 50, 1, "60", "90"),
        stats_row("Aggregated", 150, 1, "110", "190"),
    ]
    return write_stats(tmp_path / "stats_stats.csv", rows)


def test_read_stats_keeps_every_row_with_the_aggregate(stats_csv: Path) -> None:
    rows = read_stats(stats_csv)
    assert [row.name for row in rows] == ["bone_density_ct", "liver_mass_ct", "Aggregated"]
    assert rows[1].failure_ratio == pytest.approx(0.02)
    assert rows[2].percentiles_ms == {"p95": 110.0, "p99": 190.0}


def test_gate_passes_within_budgets(stats_csv: Path) -> None:
    budget = Budget(0.05, p95_ms={"*": 500}, p99_ms={"bone_density_ct": 250})
    verdict = gate(stats_csv, budget)
    assert verdict.passed
    assert verdict.table().endswith("SLO gate: PASS")
    assert len(verdict.checks) == 3 + 3 + 1  # failure ratios, p95 on all rows, one p99


def test_gate_fails_on_failure_ratio_per_name(stats_csv: Path) -> None:
    verdict = gate(stats_csv, Budget(0.01))
    failed = [(check.name, check.metric) for check in verdict.checks if not check.passed]
    assert failed == [("liver_mass_ct", "failure ratio")]  # 2 %; the aggregate is 0.67 %
    assert "FAIL (1 of 3 checks)" in verdict.table()


@pytest.mark.parametrize(
    ("budget", "failing"),
    [
        (Budget(1.0, p95_ms={"bone_density_ct": 100}), ("bone_density_ct", "p95 ms")),
        (Budget(1.0, p99_ms={"liver_mass_ct": 80}), ("liver_mass_ct", "p99 ms")),
        (Budget(1.0, p95_ms={"Aggregated": 100}), ("Aggregated", "p95 ms")),
        (Budget(1.0, p95_ms={"*": 100, "bone_density_ct": 130}), ("Aggregated", "p95 ms")),
    ],
)
def test_gate_fails_on_latency_per_name(
    stats_csv: Path, budget: Budget, failing: tuple[str, str]
) -> None:
    verdict = gate(stats_csv, budget)
    assert [(c.name, c.metric) for c in verdict.checks if not c.passed] == [failing]


def test_a_budget_for_a_name_never_requested_fails(stats_csv: Path) -> None:
    verdict = gate(stats_csv, Budget(0.1, p95_ms={"bone_density": 500}))  # typo of a task
    assert not verdict.passed
    assert "bone_density " in verdict.table() and "missing" in verdict.table()


def test_percentiles_locust_could_not_compute_fail_their_budget(tmp_path: Path) -> None:
    rows = [stats_row("liver_mass_ct", 0, 0, "N/A", "N/A")]
    verdict = evaluate(read_stats(write_stats(tmp_path / "s.csv", rows)), Budget(p95_ms={"*": 9}))
    assert [check.passed for check in verdict.checks] == [True, False]


def test_budget_refuses_impossible_limits() -> None:
    with pytest.raises(ValueError, match="max_failure_ratio"):
        Budget(1.5)
    with pytest.raises(ValueError, match="positive"):
        Budget(p95_ms={"*": 0})


def write_history(path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HISTORY_HEADER)
        writer.writerow(["1000", "0", "", "Aggregated", "0", "0", *["N/A"] * 11, "0", "0"])
        for second in range(1, 6):
            total = str(10 * second)
            percentiles = [str(30 + 10 * second + index) for index in range(11)]
            named = ["1000", "4", "grpc", "liver_mass_ct", "5", "0", *percentiles, total, "0"]
            aggregated = ["1000", "4", "", "Aggregated", "10", "0.5", *percentiles, total, "1"]
            for row in (named, aggregated):
                row[0] = str(1000 + second)
                writer.writerow([*row, "40", "45", "10", "90", "980"])
    return path


def test_read_history_takes_the_aggregate_and_blanks_the_start(tmp_path: Path) -> None:
    history = read_history(write_history(tmp_path / "stats_stats_history.csv"))
    assert history.seconds == (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)
    assert history.requests_per_s[1:] == (10.0,) * 5
    assert math.isnan(history.percentiles_ms["95%"][0])
    assert history.percentiles_ms["95%"][1] == 45.0


def test_plot_writes_a_png(tmp_path: Path) -> None:
    history_csv = write_history(tmp_path / "stats_stats_history.csv")
    png = plot_history(history_csv, tmp_path / "out" / "latency.png", title="synthetic")
    assert png.read_bytes().startswith(PNG_MAGIC)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_parses_scenarios_budgets_and_target(tmp_path: Path) -> None:
    args = parse(
        "hospital_day", "--users", "6", "--run-time", "1m30s", "--host", "10.0.0.5:8001",
        "--p95-ms", "800", "--p95-ms", "bone_density_ct=1200", "--p99-ms", "Aggregated=2000",
        "--max-failure-ratio", "0.01", "--deadline-s", "5", "--tls", "--out", str(tmp_path),
    )  # fmt: skip
    assert args.scenario == cli.SCENARIOS_DIR / "hospital_day.py"
    assert cli.run_time_s(args.run_time) == 90
    assert cli.budget_from(args) == Budget(
        0.01, p95_ms={"*": 800.0, "bone_density_ct": 1200.0}, p99_ms={"Aggregated": 2000.0}
    )
    command = cli.locust_command(args, tmp_path)
    assert command[1:3] == ["-m", "locust"]
    for flags in (
        ["--headless"],
        ["--users", "6"],
        ["--host", "10.0.0.5:8001"],
        ["--deadline-s", "5.0"],
        ["--grpc-tls"],
        ["--csv", str(tmp_path / "stats"), "--csv-full-history"],
        ["--html", str(tmp_path / "report.html")],
    ):
        start = command.index(flags[0])
        assert command[start : start + len(flags)] == flags


def test_cli_leaves_unset_target_options_to_locust() -> None:
    command = cli.locust_command(parse("bad_payload"), Path("out"))
    assert "--host" not in command and "--grpc-tls" not in command
    assert cli.out_dir(parse("spike")) == Path("build/loadtest/spike")


@pytest.mark.parametrize(
    "argv",
    [
        ["no_such_scenario"],
        ["hospital_day", "--p95-ms", "fast"],
        ["hospital_day", "--p95-ms", "=100"],
        ["hospital_day", "--p99-ms", "bone_density_ct=-5"],
    ],
)
def test_cli_refuses_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(*argv)
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("20s", 20), ("5m", 300), ("1h1s", 3601)]
)
def test_run_time_in_locust_syntax(text: str, seconds: int) -> None:
    assert cli.run_time_s(text) == seconds


@pytest.mark.parametrize("text", ["", "5 minutes", "1.5m"])
def test_run_time_refuses_other_syntax(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli.run_time_s(text)


def test_run_gates_the_statistics_of_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fake_locust(args: argparse.Namespace, out: Path, margin_s: float = 0) -> int:
        write_stats(out / "stats_stats.csv", [stats_row("Aggregated", 10, 0, "100", "150")])
        write_history(out / "stats_stats_history.csv")
        return 0

    monkeypatch.setattr(cli, "execute", fake_locust)
    out = str(tmp_path)
    assert cli.run(parse("hospital_day", "--out", out, "--p95-ms", "200")) == cli.EXIT_OK
    assert cli.run(parse("hospital_day", "--out", out, "--p95-ms", "50")) == cli.EXIT_SLO
    assert "SLO gate: FAIL" in capsys.readouterr().out
    assert (tmp_path / "latency.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    "outcome", [2, subprocess.TimeoutExpired("locust", 70)], ids=["crashed", "overran"]
)
def test_run_reports_a_locust_that_did_not_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outcome: int | Exception
) -> None:
    def fake_locust(args: argparse.Namespace, out: Path, margin_s: float = 0) -> int:
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(cli, "execute", fake_locust)
    assert cli.run(parse("hospital_day", "--out", str(tmp_path))) == cli.EXIT_LOCUST


def test_every_scenario_file_is_listed() -> None:
    names = cli.scenario_names()
    assert names == ["bad_payload", "hospital_day", "per_task", "soak", "spike", "step_ramp"]


def test_cli_side_never_imports_locust_or_gevent() -> None:
    """`abdoserve`'s parser imports the loadtests CLI; locust would monkey-patch that process."""
    code = (
        "import sys, abdoserve.loadtests.cli, abdoserve.loadtests.slo, abdoserve.loadtests.plot, "
        "abdoserve.loadtests.grpc_call, "
        "abdoserve.loadtests.connection, abdoserve.loadtests.profiles; "
        "sys.exit(sorted({'locust', 'gevent'} & set(sys.modules)) != [])"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_host_forms() -> None:
    assert split_host("10.0.0.5:8001") == ("10.0.0.5:8001", False)
    assert split_host("grpc://10.0.0.5:8001/") == ("10.0.0.5:8001", False)
    assert split_host("grpcs://abdoserve.example:443") == ("abdoserve.example:443", True)
    with pytest.raises(ValueError, match="grpcs://"):
        split_host("http://10.0.0.5:8000")


def test_connection_from_environment_variables() -> None:
    environ = {"ABDOSERVE_DEADLINE_S": "2.5", "ABDOSERVE_TLS": "true", "ABDOSERVE_POOL_SIZE": "1"}
    target = connection("h:1", options_from_environment(environ))
    assert (target.url, target.tls, target.deadline_s, target.pool_size) == ("h:1", True, 2.5, 1)
    default = connection(None, options_from_environment({}))
    assert (default.url, default.tls, default.deadline_s) == ("127.0.0.1:8001", False, 30.0)


def test_step_ramp_profile() -> None:
    counts = [step_users(t, 8, 40.0) for t in (0, 9.9, 10, 25, 39.9)]
    assert counts == [2, 2, 4, 6, 8]
    assert step_users(40.0, 8, 40.0) is None
    assert step_users(0, 1, 40.0) == 1


def test_spike_profile() -> None:
    counts = [spike_users(t, 8, 10.0) for t in (0, 3.9, 4, 5.9, 6, 9.9)]
    assert counts == [2, 2, 8, 8, 2, 2]
    assert spike_users(10.0, 8, 10.0) is None


def test_bad_payload_pool() -> None:
    pool = payload_pool("truncated", 2)
    assert len(pool) == 2 and pool is payload_pool("truncated", 2)  # built once
    assert {payload.name for payload in pool} == {f"{BAD_PAYLOAD_PREFIX}truncated"}
    with pytest.raises(ValueError, match="unknown payload kind"):
        payload_pool("liver", 1)


class FakeClient:
    """Raises as AbdoServeClient does: the typed error, tritonclient's as its cause."""

    def __init__(self, error: InferenceServerException) -> None:
        self.error = error

    def infer(self, task: str, instances: Any, clinical: Any = None) -> Any:
        assert task == "bone_density_ct"
        raise from_triton(self.error) from self.error


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        ("StatusCode.INVALID_ARGUMENT", InvalidRequestError),
        ("StatusCode.DEADLINE_EXCEEDED", DeadlineExceededError),
    ],
)
def test_a_failed_call_names_its_grpc_code_for_locust(status: str, kind: type[Exception]) -> None:
    payload = Payload("bad_payload/not_dicom", "bone_density_ct", (b"junk",), {}, 10)
    error = InferenceServerException("instance 0: not a DICOM dataset", status=status)
    outcome = timed_infer(FakeClient(error), payload)
    assert isinstance(outcome.error, kind)
    code = status.split(".")[1]
    assert repr(outcome.error).startswith(kind.__name__)
    assert f"{code}: instance 0: not a DICOM dataset" in repr(outcome.error)
    assert outcome.error.__cause__ is error
    assert outcome.response_time_ms >= 0 and outcome.response_length == 0


def test_the_soak_compares_a_minute_s_medians_not_single_samples() -> None:
    from abdoserve.loadtests.resources import Sample
    from abdoserve.loadtests.soak import median_sample, window_samples

    assert window_samples(10.0, 100) == 6 and window_samples(10.0, 5) == 2
    assert window_samples(10.0, 1) == 1
    # one sample caught in an arena's dip does not move the baseline
    levels = [485.4, 463.0, 485.4, 485.4, 490.2, 485.4]
    window = [
        Sample(at_s=600.0 + 10 * i, rss_mib={"net": v}, fds=218 + i % 2)
        for i, v in enumerate(levels)
    ]
    settled = median_sample(window)
    assert settled.rss_mib == {"net": 485.4} and settled.at_s == 600.0
    assert settled.fds == 218
    # a real leak moves the median as much as the samples
    leaking = [Sample(at_s=float(i), rss_mib={"net": 400.0 + 10 * i}) for i in range(6)]
    assert median_sample(leaking).rss_mib["net"] == 425.0
