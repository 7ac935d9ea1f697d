"""`abdoserve bench serving`'s rounds: the interleaved order, and each ratio as the
median of the rounds with its min-max (pure arithmetic on made-up measurements)."""

from __future__ import annotations

import argparse

import pytest

from abdoserve.loadtests.bench import serving
from abdoserve.loadtests.bench.report import TaskResult, TaskRounds, format_rounds, format_task
from abdoserve.loadtests.bench.rounds import Spread, interleaved, median_of, over_rounds
from abdoserve.loadtests.bench.workload import Measurement


def test_rounds_interleave_the_sides() -> None:
    assert interleaved(3, ("in process", "served")) == [
        (0, "in process"),
        (0, "served"),
        (1, "in process"),
        (1, "served"),
        (2, "in process"),
        (2, "served"),
    ]
    assert interleaved(1, ("a", "b", "c")) == [(0, "a"), (0, "b"), (0, "c")]
    with pytest.raises(ValueError, match="at least 1"):
        interleaved(0, ("a",))


def test_spread_is_the_median_and_the_extremes() -> None:
    # the two in-process runs of liver_fibrosis_ct that moved the ratio, and a third
    spread = Spread.of([105.0, 146.0, 120.0])
    assert (spread.median, spread.low, spread.high) == (120.0, 105.0, 146.0)
    assert spread.text(0) == "120 (105-146)"
    assert Spread.of([1.0, 0.75, 0.8, 0.9]).median == pytest.approx(0.85)  # even: the mean
    assert spread.summary() == {
        "median": 120.0,
        "min": 105.0,
        "max": 146.0,
        "rounds": (105.0, 146.0, 120.0),
    }
    with pytest.raises(ValueError):
        Spread.of([])


def test_over_rounds_combines_floats_and_keeps_what_agrees() -> None:
    per_round = [
        {"ratio": 1.00, "level": 4, "met": True, "by_level": {"1": 0.9}, "form": "served"},
        {"ratio": 0.75, "level": 4, "met": False, "by_level": {"1": 1.1}, "form": "served"},
        {"ratio": 0.80, "level": 16, "met": False, "by_level": {"1": 1.0}, "form": "served"},
    ]
    combined = over_rounds(per_round)
    assert combined["ratio"] == {"median": 0.8, "min": 0.75, "max": 1.0, "rounds": (1.0, 0.75, 0.8)}
    assert combined["level"] == [4, 4, 16]  # the rounds disagree: each one's is kept
    assert combined["met"] == [True, False, False]
    assert combined["form"] == "served"
    assert median_of(combined["by_level"], "1") == 1.0
    assert median_of({"level": 4}, "level") == 4.0


def row(pipeline: str, concurrency: int, per_second: float, p50_ms: float) -> Measurement:
    """Ten requests at `per_second`, half at p50_ms and half at twice that."""
    latencies = (p50_ms,) * 5 + (2 * p50_ms,) * 5
    return Measurement(pipeline, concurrency, 2.0, 10 / per_second, 0.1, latencies)


def one_round(local: float, served: tuple[float, float], p50_ms: float = 10.0) -> TaskResult:
    rows = (row("served", 1, served[0], p50_ms), row("served", 4, served[1], p50_ms))
    return TaskResult(
        "liver_fibrosis_ct",
        4,
        row("onnxruntime", 1, local, 8.0),
        row("pytorch", 1, local / 2, 16.0),
        rows,
    )


def test_each_ratio_is_taken_within_its_round_then_the_median() -> None:
    rounds = TaskRounds(
        "liver_fibrosis_ct",
        (
            one_round(105.0, (60.0, 105.0)),
            one_round(146.0, (80.0, 109.5)),
            one_round(120.0, (70.0, 114.0)),
        ),
    )
    ratios = rounds.ratios()
    throughput = ratios["served_over_in_process_throughput"]
    # per round 1.00, 0.75, 0.95: not the ratio of the medians (114 / 120 = 0.95)
    assert throughput["rounds"] == pytest.approx((1.0, 0.75, 0.95))
    assert (throughput["median"], throughput["min"], throughput["max"]) == pytest.approx(
        (0.95, 0.75, 1.0)
    )
    assert ratios["throughput_target_met"] is True  # the median, 0.95, meets >= 0.95
    assert ratios["best_concurrency"] == 4
    assert ratios["pytorch_over_onnxruntime_time"]["median"] == pytest.approx(2.0)
    assert ratios["latency_target_met"] is True  # p50 10 ms <= 1.15 x 8 + 2 = 11.2 ms
    printed = format_task(rounds)
    assert "served / in-process throughput: 0.95 (0.75-1.00) at c=4" in printed
    assert "3 interleaved rounds" in printed


def test_a_table_row_is_the_median_rate_with_its_spread() -> None:
    rows = [row("served", 4, rate, 10.0) for rate in (105.0, 146.0, 120.0)]
    words = format_rounds(rows).split()
    assert words[:3] == ["served", "gRPC", "4"]
    assert words[3:5] == ["120.00", "105.0-146.0"]
    assert float(words[5]) == pytest.approx(240.0)  # images/s: 2 images per study
    assert [float(word) for word in words[6:]] == pytest.approx([15.0, 20.0, 20.0])


def test_the_rounds_option_defaults_to_three_and_refuses_zero() -> None:
    parser = argparse.ArgumentParser()
    serving.add_arguments(parser)
    assert parser.parse_args([]).rounds == 3
    assert parser.parse_args(["--rounds", "5"]).rounds == 5
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--rounds", bad])
