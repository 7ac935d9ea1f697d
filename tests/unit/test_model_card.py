"""The model card of an imported version: checked when built, written and read back."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from abdoserve.export.model_card import (
    CARD_FILE,
    NOT_GIVEN,
    SCHEMA,
    Importer,
    ModelCard,
    ModelCardError,
    Parity,
    SelfCheck,
    Source,
    SpecDifference,
    content_id,
    read_card,
    utc_now,
    write_card,
)

SHA = "ab" * 32
CHECK = SelfCheck(study_seed=2000, output_shape=[4, 1], finite=True, max_abs_output=1.3)


def parity(max_abs_diff: float | None = 3.6e-7) -> Parity:
    eager = max_abs_diff is not None
    return Parity(
        reference="the state_dict in the reference architecture, eager PyTorch" if eager else None,
        served_by={"runtime": "onnxruntime", "precision": "fp32", "file": "model.onnx"},
        study_seeds=[2000, 2001, 2002] if eager else [],
        samples=12 if eager else 0,
        max_abs_diff=max_abs_diff,
        tolerance=1e-4,
        status="passed" if eager else "n/a",
        ort_self_check=CHECK,
    )


def card(framework: str = "pytorch", **changes: Any) -> ModelCard:
    values: dict[str, Any] = {
        "task": "liver_fibrosis_ct",
        "model": "liver_fibrosis_ct_net",
        "version": 2,
        "source": Source("hospital.pt", SHA, framework),
        "importer": Importer("abdoserve model import", "0.1.0", "2026-01-02T03:04:05Z"),
        "intended_use": "fibrosis staging of adults",
        "training_data": NOT_GIVEN,
        "spec_differences": [SpecDifference("geometry.matrix", 192, "serving choice", 224)],
        "import_adaptations": ["exported to ONNX opset 17 (model.onnx)"],
        "parity": parity(None if framework == "onnx" else 3.6e-7),
    }
    values.update(changes)
    return ModelCard(**values)


def written(tmp_path: Path, built: ModelCard | None = None) -> dict[str, Any]:
    path = write_card(built or card(), tmp_path)
    assert path.name == CARD_FILE
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def test_a_written_card_reads_back_equal_with_its_id(tmp_path: Path) -> None:
    values = written(tmp_path)
    assert values["schema"] == SCHEMA
    assert values["acceptance"] is None
    assert values["card_id"] == content_id(values) and len(values["card_id"]) == 12
    assert read_card(tmp_path / CARD_FILE) == card().with_id()


def test_the_id_follows_the_content_but_not_the_acceptance() -> None:
    first = card().with_id()
    assert card(intended_use="something else").with_id().card_id != first.card_id
    accepted = replace(first, acceptance={"verdict": "accepted"})
    assert accepted.card_id == first.card_id  # validate fills it in; the id stays


def test_every_field_of_the_exact_layout() -> None:
    values = card().with_id().to_json()
    assert sorted(values) == [
        "acceptance",
        "card_id",
        "import_adaptations",
        "importer",
        "intended_use",
        "model",
        "parity",
        "schema",
        "source",
        "spec_differences",
        "task",
        "training_data",
        "version",
    ]
    assert sorted(values["source"]) == ["file_name", "framework", "sha256"]
    assert sorted(values["importer"]) == ["imported_at", "name", "version"]


@pytest.mark.parametrize(
    "path",
    [("intended_use",), ("source", "sha256"), ("parity", "max_abs_diff"), ("acceptance",)],
    ids=".".join,
)
def test_a_missing_field_is_named(tmp_path: Path, path: tuple[str, ...]) -> None:
    values = written(tmp_path)
    holder = values
    for key in path[:-1]:
        holder = holder[key]
    del holder[path[-1]]
    with pytest.raises(ModelCardError, match=f"missing field '{path[-1]}'"):
        ModelCard.from_json(values)


def test_an_unknown_field_is_named(tmp_path: Path) -> None:
    values = written(tmp_path)
    values["weights"] = "elsewhere"
    with pytest.raises(ModelCardError, match="unknown field 'weights'"):
        ModelCard.from_json(values)


@pytest.mark.parametrize("sha", ["ab" * 31, "AB" * 32, "zz" * 32, ""])
def test_a_bad_sha256_is_refused(sha: str) -> None:
    with pytest.raises(ModelCardError, match=r"source\.sha256 must be 64 lowercase hex digits"):
        card(source=Source("hospital.pt", sha, "pytorch"))


def test_an_altered_card_no_longer_matches_its_id(tmp_path: Path) -> None:
    values = written(tmp_path)
    values["intended_use"] = "screening of everyone"
    (tmp_path / CARD_FILE).write_text(json.dumps(values))
    with pytest.raises(ModelCardError, match=r"card_id .* does not match the content"):
        read_card(tmp_path / CARD_FILE)


def test_not_given_must_be_said_not_left_empty() -> None:
    with pytest.raises(ModelCardError, match="training_data must be text, or 'not given'"):
        card(training_data="  ")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (lambda: {"source": Source("hospital.h5", SHA, "keras")}, "source.framework must be"),
        (lambda: {"source": Source("a/b.pt", SHA, "pytorch")}, "bare file name"),
        (lambda: {"version": 0}, "version must be 1 or more"),
        (lambda: {"model": "liver_fibrosis_ct"}, "model must be liver_fibrosis_ct_net"),
        (lambda: {"parity": parity(2e-4)}, r"parity.max_abs_diff 0.0002 is not within 0.0001"),
        (lambda: {"parity": parity(float("nan"))}, "is not within"),
        (lambda: {"parity": parity(None)}, "pytorch sources need an eager parity figure"),
        (
            lambda: {
                "importer": Importer("abdoserve model import", "0.1", "2026-01-02 03:04:05+02:00")
            },
            "imported_at must be UTC",
        ),
    ],
    ids=["framework", "folder", "version", "model", "over", "nan", "no-figure", "time"],
)
def test_values_a_card_may_not_hold(changes: Callable[[], dict[str, Any]], message: str) -> None:
    with pytest.raises(ModelCardError, match=message):
        card(**changes())


def test_an_onnx_card_says_parity_is_not_available() -> None:
    onnx_card = card("onnx")
    assert onnx_card.parity.max_abs_diff is None and onnx_card.parity.reference is None
    with pytest.raises(ModelCardError, match="onnx sources need parity n/a"):
        card("onnx", parity=parity(1e-7))


def test_a_non_finite_self_check_cannot_be_recorded() -> None:
    with pytest.raises(ModelCardError, match="ort_self_check: the output was not finite"):
        SelfCheck(2000, [4, 1], False, 1.0)


def test_the_time_is_utc_to_the_second() -> None:
    Importer("abdoserve model import", "0.1.0", utc_now())  # accepted as written
