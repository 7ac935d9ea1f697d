"""Result types: small frozen dataclasses parsed from the ANSWER JSON and the tensors.

Labels and their descriptions come from the ensemble's published config
parameters (`TaskInfo`), never from this module, so that a hospital's override
of a task's outputs reaches every client unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from abdoserve_client.errors import ResponseError
from abdoserve_client.model_identity import UNTRAINED_NOTICE, ModelIdentity

# Shown when the server marks weights untrained but sends no notice of its own:
# results from untrained weights must never reach a reader unlabelled.
UNTRAINED_FALLBACK_NOTICE = UNTRAINED_NOTICE

# The client's name for the one model identity type (server, client and gateway share it).
ModelInfo = ModelIdentity

# Decimals of every number in the ANSWER JSON (the tensors carry the full float32).
ANSWER_DECIMALS = 6


def answer_number(value: float) -> float:
    """A value as the ANSWER JSON states it: rounded to `ANSWER_DECIMALS`, NaN/inf kept."""
    return round(value, ANSWER_DECIMALS) if math.isfinite(value) else value


@dataclass(frozen=True)
class TaskInfo:
    """What the server publishes about a task in its ensemble's config parameters."""

    task: str
    title: str
    paper: str
    output_kind: str
    labels: tuple[str, ...]
    label_descriptions: tuple[str, ...]
    unit: str
    clinical_inputs: tuple[str, ...]
    image_roles: tuple[str, ...]
    min_images: int
    max_images: int
    model: ModelIdentity
    # Whether the ensemble takes DICOM_PACKED + DICOM_OFFSETS (servers before it take
    # only the BYTES input DICOM); read from the config's inputs, not its parameters.
    accepts_packed: bool = False

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str], version: str = "") -> TaskInfo:
        """From the ensemble config's `parameters` (see the raw protocol in README.md)."""
        try:
            images = json.loads(parameters.get("images", "{}"))
            task = parameters["task"]
            return cls(
                task=task,
                title=parameters.get("title", task),
                paper=parameters.get("paper", ""),
                output_kind=parameters["output_kind"],
                labels=tuple(json.loads(parameters["labels"])),
                label_descriptions=tuple(json.loads(parameters["label_descriptions"])),
                unit=parameters.get("unit", ""),
                clinical_inputs=tuple(json.loads(parameters.get("clinical_inputs", "[]"))),
                image_roles=tuple(images.get("roles", ())),
                min_images=int(images.get("min", 1)),
                max_images=int(images.get("max", 0)),
                model=ModelIdentity.from_mapping(parameters, name=task, version=version),
            )
        except (KeyError, ValueError, TypeError, AttributeError) as error:
            raise ResponseError(
                f"the model config lacks a valid task description: {error}"
            ) from error

    def describe(self, label: str) -> str:
        """The published description of a label ('' for an unknown label)."""
        if label in self.labels:
            return self.label_descriptions[self.labels.index(label)]
        return ""


@dataclass(frozen=True)
class ImageResult:
    """One network sample's values and the request instance it came from (0-based)."""

    instance: int
    values: tuple[float, ...]


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no single truth value
class StudyResult:
    """A study-level answer; `answer` is the server's ANSWER JSON as sent.

    `roles` maps each image role (phase or section level) to its request instance, for
    the tasks whose images are the channels of one sample; it is empty otherwise.
    """

    task: str
    title: str
    model: ModelIdentity
    labels: tuple[str, ...]
    study_values: np.ndarray  # STUDY, shape (K,)
    image_values: np.ndarray  # SCORES, shape (samples, K)
    images: tuple[ImageResult, ...]
    roles: Mapping[str, int]
    notice: str | None
    answer: Mapping[str, Any] = field(repr=False)

    @property
    def untrained(self) -> bool:
        """True when untrained reference weights answered: never a diagnosis."""
        return self.model.untrained


@dataclass(frozen=True, eq=False)
class ClassificationResult(StudyResult):
    """The most probable class (`label`, `description`) and every class's probability."""

    label: str
    description: str
    probabilities: Mapping[str, float]


@dataclass(frozen=True, eq=False)
class ScoreResult(StudyResult):
    """One continuous study value (a regression or a probability), its stage and flags."""

    name: str
    value: float
    unit: str
    stage: str | None
    stage_description: str | None
    flags: Mapping[str, bool]


class LiverMassResult(ClassificationResult):
    """Liver mass category A-E on dynamic CT."""


class FibrosisResult(ScoreResult):
    """Fibrosis score on the 0-4 scale and its stage F0-F4 (CT or MRI)."""

    @property
    def score(self) -> float:
        """F_DLCT or F_DLMRI on the 0-4 stage scale."""
        return self.value


class BoneDensityResult(ScoreResult):
    """Lumbar BMD in g/cm2 and the osteoporosis flag."""

    @property
    def bmd(self) -> float:
        """Lumbar bone mineral density in g/cm²."""
        return self.value

    @property
    def osteoporosis(self) -> bool:
        """Whether the BMD is at or below the configured osteoporosis threshold."""
        return self.flags.get("osteoporosis", False)


class EsophagealCancerResult(ScoreResult):
    """Per-patient probability of oesophageal cancer, its flag, and per-image probabilities."""

    @property
    def probability(self) -> float:
        """Per-patient probability (the maximum over the images)."""
        return self.value

    @property
    def suspicious(self) -> bool:
        """Whether the per-patient probability reaches the configured threshold."""
        return self.flags.get("suspicious", False)

    @property
    def image_probabilities(self) -> tuple[float, ...]:
        """Per-image probabilities, in the order of the request's instances."""
        return tuple(image.values[0] for image in self.images)


# The public task names are the API; a task the client does not know still parses
# by its published output kind.
RESULT_TYPES: Mapping[str, type[StudyResult]] = {
    "liver_mass_ct": LiverMassResult,
    "liver_fibrosis_ct": FibrosisResult,
    "liver_fibrosis_mri": FibrosisResult,
    "bone_density_ct": BoneDensityResult,
    "esophageal_cancer_ct": EsophagealCancerResult,
}


def parse_result(
    info: TaskInfo, answer_json: bytes | str, scores: np.ndarray, study: np.ndarray
) -> StudyResult:
    """A typed result from the ANSWER JSON and the SCORES / STUDY tensors (batch dim optional)."""
    answer = _load_answer(answer_json)
    image_values = _squeeze_batch(np.asarray(scores, dtype=np.float32), 3)
    study_values = _squeeze_batch(np.asarray(study, dtype=np.float32), 2)
    common = _common_fields(info, answer, image_values, study_values)
    kind = RESULT_TYPES.get(info.task)
    if info.output_kind == "classification":
        kind = kind if kind and issubclass(kind, ClassificationResult) else ClassificationResult
        return kind(**common, **_classification_fields(info, answer, study_values))
    kind = kind if kind and issubclass(kind, ScoreResult) else ScoreResult
    return kind(**common, **_score_fields(info, answer, study_values))


def _load_answer(answer_json: bytes | str) -> dict[str, Any]:
    try:
        answer = json.loads(answer_json)
    except ValueError as error:
        raise ResponseError(f"ANSWER is not JSON: {error}") from error
    if not isinstance(answer, dict) or not isinstance(answer.get("result"), dict):
        raise ResponseError("ANSWER lacks a 'result' object")
    return answer


def _squeeze_batch(values: np.ndarray, ndim: int) -> np.ndarray:
    """Drop the leading batch dim of 1 that every response carries."""
    if values.ndim == ndim:
        if values.shape[0] != 1:
            raise ResponseError(f"expected a batch of 1, got shape {values.shape}")
        values = values[0]
    if values.ndim != ndim - 1:
        raise ResponseError(f"unexpected tensor shape {values.shape}")
    return values


def _common_fields(
    info: TaskInfo, answer: Mapping[str, Any], image_values: np.ndarray, study_values: np.ndarray
) -> dict[str, Any]:
    entries = answer.get("images", [])
    if len(entries) != image_values.shape[0]:
        raise ResponseError(
            f"ANSWER lists {len(entries)} images but SCORES has {image_values.shape[0]} rows"
        )
    model = ModelIdentity.from_mapping(answer.get("model", {}), name=info.task)
    notice = answer.get("notice") or (UNTRAINED_FALLBACK_NOTICE if model.untrained else None)
    images = tuple(
        ImageResult(int(entry["instance"]), tuple(float(value) for value in row))
        for entry, row in zip(entries, image_values, strict=True)
    )
    return {
        "task": info.task,
        "title": info.title,
        "model": model,
        "labels": info.labels,
        "study_values": study_values,
        "image_values": image_values,
        "images": images,
        "roles": _roles(answer),
        "notice": notice,
        "answer": answer,
    }


def _roles(answer: Mapping[str, Any]) -> dict[str, int]:
    roles = answer.get("roles") or {}
    if not isinstance(roles, Mapping) or not all(
        isinstance(index, int) and not isinstance(index, bool) for index in roles.values()
    ):
        raise ResponseError("ANSWER's roles must map each role to an instance index")
    return {str(role): index for role, index in roles.items()}


def _classification_fields(
    info: TaskInfo, answer: Mapping[str, Any], study_values: np.ndarray
) -> dict[str, Any]:
    if study_values.shape != (len(info.labels),):
        raise ResponseError(f"STUDY has shape {study_values.shape} for {len(info.labels)} labels")
    label = str(answer["result"].get("label") or info.labels[int(np.argmax(study_values))])
    return {
        "label": label,
        "description": info.describe(label),
        "probabilities": {
            name: float(value) for name, value in zip(info.labels, study_values, strict=True)
        },
    }


def _score_fields(
    info: TaskInfo, answer: Mapping[str, Any], study_values: np.ndarray
) -> dict[str, Any]:
    if study_values.shape != (1,):
        raise ResponseError(f"STUDY has shape {study_values.shape}; expected one value")
    result = answer["result"]
    stage = result.get("stage")
    return {
        "name": info.labels[0],
        "value": float(study_values[0]),
        "unit": info.unit,
        "stage": stage,
        "stage_description": info.describe(stage) if stage else None,
        "flags": {key: value for key, value in result.items() if isinstance(value, bool)},
    }
