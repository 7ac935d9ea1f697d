"""`abdoserve bench replicas --autoscale`'s arithmetic: the adapter's query as PromQL, the
HPA's target and its replica formula; and the option that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from abdoserve.deploy.cli import build_parser
from abdoserve.loadtests.bench import autoscale, replicas
from abdoserve.loadtests.bench.autoscale import adapter_query, desired_replicas, hpa_target


def test_the_adapter_query_is_filled_in_for_the_pods_of_a_namespace() -> None:
    query = adapter_query()
    assert "<<" not in query and 'namespace="local",pod!=""' in query
    assert "by (pod)" in query


def test_the_hpa_target_reads_milli_units(tmp_path: Path) -> None:
    hpa = tmp_path / "hpa.yaml"
    hpa.write_text('target:\n  type: AverageValue\n  averageValue: "250m"\n')
    assert hpa_target(hpa) == pytest.approx(0.25)
    hpa.write_text("target:\n  averageValue: 2\n")
    assert hpa_target(hpa) == 2.0
    assert hpa_target() > 0  # the shipped one


@pytest.mark.parametrize(
    ("current", "values", "target", "desired"),
    [
        (2, [0.1, 0.1], 0.2, 1),  # half the target: half the replicas
        (2, [0.4, 0.4], 0.2, 4),
        (2, [0.21, 0.2], 0.2, 2),  # within the 10 % tolerance: unchanged
        (3, [0.0, 0.0, 0.0], 0.2, 1),  # idle: the minimum
        (2, [], 0.2, 2),  # no data: no change
        (1, [0.25], 0.2, 2),  # ceil
    ],
)
def test_the_hpa_formula(current: int, values: list[float], target: float, desired: int) -> None:
    assert desired_replicas(current, values, target) == desired


def test_the_ramp_is_an_option_of_bench_replicas() -> None:
    words = ["bench", "replicas", "--autoscale", "--users", "48", "--run-time", "4m"]
    args = build_parser(words).parse_args(words)
    assert args.run is replicas.run
    assert args.autoscale and args.users == 48 and args.run_time == "4m" and args.replicas == 2
    plain = build_parser(["bench", "replicas"]).parse_args(["bench", "replicas"])
    assert plain.autoscale is False
    assert not hasattr(autoscale, "run")  # no command of its own
