"""The routing document: which version answers a study, which runs beside it, and what
must stay loaded (abdoserve.serving.routing)."""

from __future__ import annotations

import hashlib

import pytest

from abdoserve.serving.routing import (
    BUCKETS,
    Routing,
    RoutingError,
    bucket,
    served_routing,
)

KEYS = [hashlib.sha256(str(number).encode()).hexdigest() for number in range(4000)]


def share(routing: Routing, version: int) -> float:
    return sum(routing.answering(key) == version for key in KEYS) / len(KEYS)


def test_production_alone_answers_everything_and_has_no_companion() -> None:
    routing = Routing(production=3)
    assert {routing.answering(key) for key in KEYS} == {3}
    assert {routing.companion(key) for key in KEYS} == {None}
    assert routing.versions(now=0.0) == (3,)


@pytest.mark.parametrize("percent", [0.0, 10.0, 25.0, 50.0, 100.0])
def test_a_canary_answers_its_share_of_studies(percent: float) -> None:
    routing = Routing(production=1, candidate=2, mode="canary", percent=percent)
    # 4,000 keys: a binomial share's standard deviation is at most 0.8 %.
    assert share(routing, 2) == pytest.approx(percent / 100, abs=0.03)


def test_a_study_keeps_its_version_and_a_wider_canary_only_adds_studies() -> None:
    narrow = Routing(production=1, candidate=2, mode="canary", percent=20.0)
    wide = narrow.changed(percent=40.0)
    for key in KEYS:
        assert narrow.answering(key) == narrow.answering(key)
        if narrow.answering(key) == 2:
            assert wide.answering(key) == 2


def test_production_runs_beside_each_canary_answer_and_the_candidate_beside_a_shadowed_one() -> (
    None
):
    canary = Routing(production=1, candidate=2, mode="canary", percent=30.0)
    for key in KEYS[:500]:
        answering = canary.answering(key)
        assert canary.companion(key) == (1 if answering == 2 else None)
    shadow = Routing(production=1, candidate=2, mode="shadow", percent=10.0)
    assert {shadow.answering(key) for key in KEYS} == {1}
    sampled = sum(shadow.companion(key) == 2 for key in KEYS) / len(KEYS)
    assert sampled == pytest.approx(0.10, abs=0.02)


def test_buckets_spread_evenly() -> None:
    counts = [0] * 10
    for key in KEYS:
        counts[bucket(key) * 10 // BUCKETS] += 1
    assert min(counts) > 300 and max(counts) < 500  # 400 expected per tenth


def test_the_previous_version_stays_loaded_until_its_window_closes() -> None:
    promoted = Routing(production=2, previous=1, previous_until=100.0)
    assert promoted.versions(now=99.0) == (1, 2)
    assert promoted.state_of(1, now=99.0) == "previous"
    assert promoted.versions(now=100.0) == (2,)
    assert promoted.state_of(1, now=100.0) == "retired"
    assert promoted.state_of(2, now=0.0) == "serving"
    canary = Routing(production=2, candidate=3, mode="canary", percent=5.0)
    assert canary.state_of(3, now=0.0) == "canary"
    assert canary.versions(now=0.0) == (2, 3)


def test_the_document_round_trips_and_changes_raise_the_generation() -> None:
    routing = Routing(production=1, candidate=2, mode="shadow", percent=100.0, generation=4)
    assert Routing.from_json(routing.to_json()) == routing
    changed = routing.changed(mode="canary", percent=25.0, reason="operator")
    assert (changed.generation, changed.mode, changed.reason) == (5, "canary", "operator")


@pytest.mark.parametrize(
    ("document", "match"),
    [
        ("not json", "routing is not JSON"),
        ("[1]", "must be a JSON object"),
        ("{}", "needs 'production'"),
        ('{"production": 0}', "'production' must be a version number >= 1"),
        ('{"production": true}', "'production' must be a version number"),
        ('{"production": "1"}', "'production' must be a version number"),
        ('{"production": 1, "mode": "blue-green"}', "'mode' must be one of none, canary, shadow"),
        ('{"production": 1, "mode": "canary"}', "mode 'canary' needs a 'candidate'"),
        ('{"production": 1, "candidate": 1}', "'candidate' must differ from 'production'"),
        ('{"production": 1, "candidate": 2, "percent": 101}', r"'percent' must be within"),
        ('{"production": 1, "candidate": 2, "percent": "5"}', "routing"),
        ('{"production": 1, "colour": "red"}', "unknown fields: colour"),
    ],
)
def test_a_document_that_cannot_be_served_is_refused_by_field(document: str, match: str) -> None:
    with pytest.raises(RoutingError, match=match):
        Routing.from_json(document)


def test_what_is_served_comes_from_the_parameter_else_the_build() -> None:
    assert served_routing({"model_version": "1"}) == Routing(production=1)
    parameter = Routing(production=3, generation=9).to_json()
    assert served_routing({"routing": parameter, "model_version": "1"}).production == 3
