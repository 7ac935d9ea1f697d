"""Rounds of `abdoserve bench serving`: interleaved, then each ratio as a median and spread.

One pass is not enough on a shared machine: two runs measured in-process
liver_fibrosis_ct at 105 and 146 studies/s, which moved the shared-memory ratio between
1.00 and 0.75. So each round measures both sides (in process, then served) back to
back, rounds alternate, each ratio is taken within its round (both sides saw the same
machine) and the report gives the median of the rounds with their min-max.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_ROUNDS = 3
MIN_ROUNDS = 1


def interleaved(rounds: int, sides: Sequence[str]) -> list[tuple[int, str]]:
    """The order of the measurements: every side once per round, rounds one after another
    (in-process, served, in-process, served, ...)."""
    if rounds < MIN_ROUNDS:
        raise ValueError(f"rounds must be at least {MIN_ROUNDS}, got {rounds}")
    return [(number, side) for number in range(rounds) for side in sides]


@dataclass(frozen=True)
class Spread:
    """The median of one figure over the rounds, and its lowest and highest value."""

    median: float
    low: float
    high: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no rounds to take a median of")
        return cls(float(statistics.median(values)), min(values), max(values), tuple(values))

    def summary(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.low, "max": self.high, "rounds": self.values}

    def text(self, digits: int = 2) -> str:
        """'0.92 (0.85-0.97)': the median, then the spread over the rounds."""
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f})"


def _is_number(value: object) -> bool:
    return isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool))


def over_rounds(per_round: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One mapping of figures per round -> the same keys with each float a `Spread`
    summary (nested mappings alike). A value every round agrees on stays as it is (a
    concurrency level, a form's name); one they differ on becomes the list per round."""
    combined: dict[str, Any] = {}
    for key in per_round[0]:
        values = [figures[key] for figures in per_round if key in figures]
        if all(isinstance(value, Mapping) for value in values):
            combined[key] = over_rounds(values)
        elif all(isinstance(value, float) for value in values) and len(values) == len(per_round):
            combined[key] = Spread.of(values).summary()
        elif all(value == values[0] for value in values):
            combined[key] = values[0]
        else:
            combined[key] = values
    return combined


def median_of(figures: Mapping[str, Any], key: str) -> float:
    """The median of a figure `over_rounds` combined (a number where it did not vary)."""
    value = figures[key]
    return float(value["median"]) if isinstance(value, Mapping) else float(value)


def spread_of(figures: Mapping[str, Any], key: str) -> Spread:
    """The `Spread` behind a combined figure (one value where every round agreed)."""
    value = figures[key]
    if isinstance(value, Mapping):
        return Spread.of(list(value["rounds"]))
    if _is_number(value):
        return Spread.of([float(value)])
    raise TypeError(f"{key} is not a number: {value!r}")
