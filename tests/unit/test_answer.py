"""Study answers: aggregation, stages, flags, labels, the untrained notice, and the
runtime provenance (an INT8 answer carries its measured deviation)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from abdoserve.preprocessing.tasks import TASKS
from abdoserve.serving.answer import (
    UNTRAINED_NOTICE,
    ModelIdentity,
    aggregate,
    interpret,
    study_answer,
)

UNTRAINED = ModelIdentity.from_parameters("bone_density_ct", "1", {"weights_source": "seeded"})
TRAINED = ModelIdentity.from_parameters(
    "bone_density_ct", "3", {"weights_untrained": "false", "weights_sha256": "ab12"}
)


def test_aggregation_mean_max_and_none() -> None:
    per_sample = np.array([[0.2], [0.8], [0.5]], dtype=np.float32)
    np.testing.assert_allclose(aggregate(TASKS["bone_density_ct"].output, per_sample), [0.5])
    np.testing.assert_allclose(aggregate(TASKS["esophageal_cancer_ct"].output, per_sample), [0.8])
    probabilities = np.array([[0.1, 0.2, 0.3, 0.3, 0.1]], dtype=np.float32)
    np.testing.assert_array_equal(
        aggregate(TASKS["liver_mass_ct"].output, probabilities), probabilities[0]
    )


@pytest.mark.parametrize(
    ("score", "stage"),
    [
        (0.0, "F0"),
        (0.49, "F0"),
        (0.5, "F1"),
        (1.2, "F1"),
        (2.5, "F3"),
        (3.49, "F3"),
        (3.5, "F4"),
        (4.0, "F4"),
    ],
)
def test_stage_from_cutoffs(score: float, stage: str) -> None:
    result = interpret(TASKS["liver_fibrosis_ct"].output, np.array([score], dtype=np.float32))
    assert result["stage"] == stage
    assert result["F_DLCT"] == pytest.approx(score, abs=1e-6) and result["unit"] == "stage"


@pytest.mark.parametrize(("bmd", "flag"), [(0.5, True), (0.70, True), (0.71, False), (1.1, False)])
def test_osteoporosis_flag_at_or_below_the_cutoff(bmd: float, flag: bool) -> None:
    result = interpret(TASKS["bone_density_ct"].output, np.array([bmd], dtype=np.float64))
    assert result["osteoporosis"] is flag
    assert result["BMD"] == pytest.approx(bmd) and "stage" not in result


@pytest.mark.parametrize(("probability", "flag"), [(0.2, False), (0.5, True), (0.93, True)])
def test_suspicious_flag_at_or_above_the_cutoff(probability: float, flag: bool) -> None:
    result = interpret(TASKS["esophageal_cancer_ct"].output, np.array([probability]))
    assert result["suspicious"] is flag


def test_classification_label_and_probabilities() -> None:
    probabilities = np.array([0.05, 0.1, 0.15, 0.6, 0.1], dtype=np.float32)
    result = interpret(TASKS["liver_mass_ct"].output, probabilities)
    assert result["label"] == "D" and result["description"] == "haemangioma"
    assert result["probabilities"] == {"A": 0.05, "B": 0.1, "C": 0.15, "D": 0.6, "E": 0.1}


def test_study_answer_with_untrained_weights_carries_the_notice() -> None:
    spec = TASKS["bone_density_ct"]
    per_sample = np.array([[0.9], [0.7], [0.5]], dtype=np.float32)
    study, answer = study_answer(spec, per_sample, [2, 0, 1], UNTRAINED)
    np.testing.assert_allclose(study, [0.7])
    assert study.dtype == np.float32
    assert answer["notice"] == UNTRAINED_NOTICE
    assert answer["model"] == {
        "name": "bone_density_ct",
        "version": "1",
        "weights_source": "seeded",
        "weights_sha256": "",
        "untrained": True,
        "runtime": {"name": "unknown", "precision": "unknown"},
        "card_id": "",
    }
    assert answer["result"]["osteoporosis"] is True
    assert answer["images"] == [
        {"instance": 2, "values": [0.9]},
        {"instance": 0, "values": [0.7]},
        {"instance": 1, "values": [0.5]},
    ]
    assert answer["task"] == "bone_density_ct" and "roles" not in answer


def test_study_answer_with_trained_weights_has_no_notice() -> None:
    spec = TASKS["liver_fibrosis_mri"]
    roles = {"cranial": 1, "middle": 0, "caudal": 2}
    _, answer = study_answer(spec, np.array([[2.7]], dtype=np.float32), [1], TRAINED, roles)
    assert "notice" not in answer and answer["model"]["untrained"] is False
    assert answer["model"]["weights_sha256"] == "ab12"
    assert answer["roles"] == roles
    assert answer["result"]["stage"] == "F3"


@pytest.mark.parametrize(
    ("flag", "untrained"), [("false", False), ("FALSE", False), ("true", True), ("no", True)]
)
def test_anything_not_marked_trained_is_untrained(flag: str, untrained: bool) -> None:
    identity = ModelIdentity.from_parameters("x", "1", {"weights_untrained": flag})
    assert identity.untrained is untrained
    assert ModelIdentity.from_parameters("x", "1", {}).weights_source == "unknown"


DEVIATION = {
    "reference": "PyTorch FP32",
    "max_abs": 0.0123,
    "mean_abs": 0.0045,
    "agreement_of": "stage",
    "study_agreement": 1.0,
    "held_out_studies": 6,
}


def test_answer_names_the_runtime_and_an_int8_deviation() -> None:
    identity = ModelIdentity.from_parameters(
        "liver_fibrosis_ct",
        "1",
        {
            "weights_untrained": "false",
            "runtime": "openvino-int8",
            "runtime_precision": "int8",
            "runtime_deviation": json.dumps(DEVIATION),
        },
    )
    spec = TASKS["liver_fibrosis_ct"]
    _, answer = study_answer(spec, np.array([[1.2]], dtype=np.float32), [0], identity)
    assert answer["model"]["runtime"] == {
        "name": "openvino-int8",
        "precision": "int8",
        "deviation": DEVIATION,
    }
    json.dumps(answer)  # the answer travels as JSON


def test_a_runtime_without_a_measured_deviation_names_only_itself() -> None:
    identity = ModelIdentity.from_parameters(
        "bone_density_ct", "1", {"runtime": "onnxruntime", "runtime_precision": "fp32"}
    )
    _, answer = study_answer(
        TASKS["bone_density_ct"], np.array([[1.0]], dtype=np.float32), [0], identity
    )
    assert answer["model"]["runtime"] == {"name": "onnxruntime", "precision": "fp32"}


def test_a_deviation_that_is_not_a_json_object_fails_the_load() -> None:
    with pytest.raises(ValueError, match="runtime_deviation"):
        ModelIdentity.from_parameters("x", "1", {"runtime_deviation": "[1, 2]"})
