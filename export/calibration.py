"""DICOM-derived tensors from phantom studies: INT8 calibration and the held-out set.

Both come from real DICOM instances (`abdoserve.export.phantom`) through the
served preprocessing (`StudyPreparer`), so the INT8 ranges and the measured
deviation are those of tensors the network really receives. Calibration and
held-out seeds never overlap, nor meet the warm-up study's (0) or the tests' and
benchmarks' small seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from abdoserve.preprocessing.specs import TaskSpec
from abdoserve.preprocessing.study import StudyPreparer

CALIBRATION_FIRST_SEED = 1000
HELD_OUT_FIRST_SEED = 2000


@dataclass(frozen=True)
class StudyTensors:
    """One phantom study as the `_net` receives it."""

    seed: int
    samples: np.ndarray  # float32 (n, C, M, M), values in [0, 1]
    features: np.ndarray  # float32 (F,); empty where the task has no clinical inputs

    def feeds(self) -> dict[str, np.ndarray]:
        """The `_net` graph's inputs for this study (features repeated per sample)."""
        feeds = {"samples": self.samples}
        if self.features.size:
            feeds["features"] = np.repeat(self.features[None, :], len(self.samples), axis=0)
        return feeds


@dataclass(frozen=True)
class CalibrationPlan:
    """Phantom studies per task: some calibrate INT8, others (disjoint) measure deviation.

    The defaults add 5-13 s to a build of all five tasks on 2 cores (docs/benchmarks.md);
    tests use fewer.
    """

    calibration_studies: int = 8
    held_out_studies: int = 6

    def __post_init__(self) -> None:
        if not 1 <= self.calibration_studies <= HELD_OUT_FIRST_SEED - CALIBRATION_FIRST_SEED:
            raise ValueError("calibration_studies must be 1..1000 (the seed ranges stay apart)")
        if self.held_out_studies < 1:
            raise ValueError("held_out_studies must be at least 1")

    def calibration_seeds(self) -> tuple[int, ...]:
        return tuple(
            range(CALIBRATION_FIRST_SEED, CALIBRATION_FIRST_SEED + self.calibration_studies)
        )

    def held_out_seeds(self) -> tuple[int, ...]:
        return tuple(range(HELD_OUT_FIRST_SEED, HELD_OUT_FIRST_SEED + self.held_out_studies))


def phantom_tensors(spec: TaskSpec, seeds: Sequence[int]) -> list[StudyTensors]:
    """Each seed's phantom study for the task, prepared as the served preprocess does."""
    from abdoserve.export.phantom import build_study

    prepare = StudyPreparer(spec)
    tensors = []
    for seed in seeds:
        study = build_study(spec.name, seed=seed)
        prepared = prepare(study.instances, study.clinical)
        tensors.append(StudyTensors(seed, prepared.samples, prepared.features))
    return tensors
