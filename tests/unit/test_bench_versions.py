"""`abdoserve bench versions`' table: medians over rounds, and each state's p50 over
production only's in the same round."""

from __future__ import annotations

from abdoserve.loadtests.bench.versions import STATES, Level, format_levels


def level(state: str, concurrency: int, round_: int, p50: float) -> Level:
    return Level(state, concurrency, round_, p50, 2 * p50, 1000 / p50, 1.5, 9.0)


def test_the_table_gives_each_state_against_production_only_round_by_round() -> None:
    levels = [
        level(state, 1, round_, p50)
        for round_, base in ((1, 20.0), (2, 22.0), (3, 40.0))
        for state, p50 in zip(STATES, (base, base * 1.1, base * 1.5, base * 1.2), strict=True)
    ]
    lines = format_levels(levels).splitlines()
    assert lines[0].split()[:4] == ["state", "conc", "p50", "ms"]
    rows = {line[:16].strip(): line[16:].split() for line in lines[1:]}
    assert list(rows) == list(STATES)
    assert rows["production only"][:2] == ["1", "22.0"]  # the median over rounds
    assert rows["shadow 100 %"][4:6] == ["1.50", "(1.50-1.50)"]  # a steady ratio
    assert rows["shadow 10 %"][4] == "1.10"
