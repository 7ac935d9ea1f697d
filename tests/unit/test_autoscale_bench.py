"""`abdoserve bench autoscale`'s arithmetic: the adapter's query as PromQL, the HPA's
target and its replica formula."""

from __future__ import annotations

from pathlib import Path

import pytest

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
