"""The canary's automatic rollback judged from /metrics text as Triton writes it
(abdoserve.deploy.rollback_watch)."""

from __future__ import annotations

import pytest

from abdoserve.deploy.rollback_watch import (
    CanaryCounts,
    RollbackBounds,
    RollbackWatch,
    judge,
    parse_metrics,
    quantile,
)
from abdoserve.serving.routing import Routing

TASK = "bone_density_ct"
CANARY = Routing(production=1, candidate=2, mode="canary", percent=25.0, generation=3)
BOUNDS = RollbackBounds(window_s=60.0, min_studies=20)
LE = ("0.01", "0.05", "0.1", "0.25", "0.5", "1.0", "+Inf")


def metrics(
    *,
    answers: int = 0,
    failures: int = 0,
    agree: int = 0,
    disagree: int = 0,
    candidate_s: float = 0.01,
    production_s: float = 0.01,
) -> str:
    """/metrics text with the postprocess model's families (other tasks' lines beside)."""

    def histogram(version: str, seconds: float, count: int) -> list[str]:
        return [
            f'abdoserve_version_duration_seconds_bucket{{le="{le}",task="{TASK}",'
            f'version="{version}"}} {count if float(le) >= seconds else 0}'
            for le in LE
        ] + [
            f'abdoserve_version_duration_seconds_count{{task="{TASK}",version="{version}"}} {count}'
        ]

    pair = 'answering="2",companion="1"'
    lines = [
        "# TYPE abdoserve_version_answers_total counter",
        f'abdoserve_version_answers_total{{route="canary",task="{TASK}",version="2"}} {answers}',
        'abdoserve_version_answers_total{route="canary",task="liver_mass_ct",version="2"} 999',
        "# TYPE abdoserve_version_failures_total counter",
        f'abdoserve_version_failures_total{{task="{TASK}",version="2"}} {failures}',
        "# TYPE abdoserve_version_comparisons_total counter",
        f'abdoserve_version_comparisons_total{{{pair},result="agree",task="{TASK}"}} {agree}',
        f'abdoserve_version_comparisons_total{{{pair},result="disagree",task="{TASK}"}} {disagree}',
        "# TYPE abdoserve_version_duration_seconds histogram",
        *histogram("2", candidate_s, answers),
        *histogram("1", production_s, 3 * answers),
    ]
    return "\n".join(lines) + "\n"


def watched(first: str, second: str, seconds: float = 30.0) -> str | None:
    watch = RollbackWatch(BOUNDS)
    assert watch.breach(TASK, CANARY, parse_metrics(first), now=100.0) is None
    breach = watch.breach(TASK, CANARY, parse_metrics(second), now=100.0 + seconds)
    return None if breach is None else f"{breach.bound}: {breach.detail}"


def test_a_healthy_canary_is_left_alone() -> None:
    assert watched(metrics(), metrics(answers=40, agree=38, disagree=2)) is None


def test_a_candidate_that_disagrees_is_rolled_back_naming_the_figure() -> None:
    found = watched(metrics(), metrics(answers=30, agree=3, disagree=27))
    assert found == (
        "disagreement: disagreement with production 0.90 > 0.25 over 30 s (30 canary studies)"
    )


def test_a_candidate_that_fails_is_rolled_back() -> None:
    found = watched(metrics(answers=10), metrics(answers=30, failures=5))
    assert found is not None and found.startswith("errors: error ratio 0.20 > 0.05")


def test_a_slow_candidate_is_rolled_back_but_not_one_slow_only_in_milliseconds() -> None:
    slow = watched(metrics(), metrics(answers=30, agree=30, candidate_s=1.0, production_s=0.05))
    assert slow is not None and slow.startswith("latency: p95 1.000 s > 3 x production's 0.050 s")
    assert watched(metrics(), metrics(answers=30, agree=30, candidate_s=0.1)) is None


def test_too_few_studies_are_no_evidence() -> None:
    assert watched(metrics(), metrics(answers=19, disagree=19)) is None


def test_only_the_window_counts() -> None:
    watch = RollbackWatch(BOUNDS)
    # An early bad spell, then a minute and more of agreement: judged on the last minute.
    for now, text in [
        (0.0, metrics()),
        (10.0, metrics(answers=30, disagree=30)),
        (80.0, metrics(answers=60, disagree=30, agree=30)),
        (140.0, metrics(answers=90, disagree=30, agree=60)),
    ]:
        breach = watch.breach(TASK, CANARY, parse_metrics(text), now)
    assert breach is None
    assert watch.breach(TASK, CANARY, parse_metrics(metrics(answers=91)), now=10.0) is None


def test_nothing_is_watched_outside_a_canary() -> None:
    watch = RollbackWatch(BOUNDS)
    shadow = Routing(production=1, candidate=2, mode="shadow", percent=100.0)
    bad = parse_metrics(metrics(answers=50, disagree=50))
    assert watch.breach(TASK, shadow, bad, now=0.0) is None
    assert watch.history == {}


def test_judge_and_quantile_on_their_own() -> None:
    assert judge(CanaryCounts(answers=5, failures=5), BOUNDS, 10.0) is None
    assert quantile([(0.1, 50.0), (0.5, 95.0), (float("inf"), 100.0)], 0.95) == 0.5
    assert quantile([(0.1, 0.0), (float("inf"), 0.0)], 0.95) is None
    assert quantile([(0.1, 1.0), (float("inf"), 100.0)], 0.95) == pytest.approx(0.1)
