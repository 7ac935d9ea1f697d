"""The explanation benchmarks' arithmetic, on hand-made timings."""

from __future__ import annotations

from abdoserve.loadtests.bench.explain import table
from abdoserve.loadtests.bench.gateway import WITH, WITHOUT, maps_ratio


def test_the_explain_table_gives_the_median_ratio_over_rounds_and_its_spread() -> None:
    results = {
        "bone_density_ct": {
            "seconds": {"infer": [0.05, 0.06, 0.04], "infer+explain": [1.0, 0.9, 1.1]},
            "ratio": {"rounds": [20.0, 15.0, 27.5]},
        }
    }
    line = table(results).splitlines()[1]
    assert line.split() == ["bone_density_ct", "50.0", "1000.0", "20.00", "(15.00-27.50)"]


def test_the_gateway_maps_ratio_compares_p50s_of_the_same_run() -> None:
    rows = [
        {"side": WITHOUT, "total_s": 1.5, "settled_s": 1.5},
        {"side": WITHOUT, "total_s": 1.7, "settled_s": 1.7},
        {"side": WITH, "total_s": 1.8, "settled_s": 3.0},
        {"side": WITH, "total_s": 2.0, "settled_s": 4.0},
    ]
    text = maps_ratio(rows)
    assert "SR stored 1.19x (1900 vs 1600 ms)" in text
    assert "everything delivered 2.19x (3500 vs 1600 ms)" in text
