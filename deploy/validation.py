"""`abdoserve model validate`: a version's acceptance on local labelled studies, through a
running server, so that what is validated is what serves.

1. The routing names the cohort's studies (their keys: SHA-256 of each study's sorted
   SOP Instance UIDs, as the preprocess model computes them) and the version to
   validate (`Routing.validating`). Only those studies go to that version, through the
   whole served path: the ensemble, the preprocess model, the version's network on its
   runtime, the answer. Every other study is answered as before.
2. Each study goes to the server like any client's, and its answer must name the
   version (a replica that has not loaded the change yet is asked again).
3. The papers' metrics with bootstrap CIs (deploy/acceptance_metrics.py) are judged
   against the task's thresholds (deploy/acceptance_thresholds.json, or the hospital's
   own file), and written as Markdown, JSON and PNG plots (deploy/validation_report.py).
4. The routing is put back as it was (the version and keys removed), with the verdict
   recorded in it (`acceptance`), where `promote` reads it on every replica; the
   figures go into the version's model card where the repository is at hand.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abdoserve.deploy.acceptance_metrics import AcceptanceReport, read_labels, report_from_answers
from abdoserve.deploy.validation_report import write_report
from abdoserve.deploy.versions import VersionControl, VersionError
from abdoserve.preprocessing.specs import TaskSpec
from abdoserve.preprocessing.study_profile import StudyProfile, study_profile
from abdoserve.serving.drift import answer_feature, reference, study_bins
from abdoserve.serving.drift_bins import REFERENCE_FILE
from abdoserve.serving.routing import Routing

THRESHOLDS_FILE = Path(__file__).with_name("acceptance_thresholds.json")
ADOPTION_TIMEOUT_S = 300.0  # for every replica to load the version and the cohort's keys


@dataclass(frozen=True)
class Verdict:
    passed: bool
    lines: tuple[str, ...]  # one per threshold: the figure, the bound, and pass or fail


@dataclass(frozen=True)
class Study:
    name: str
    instances: list[bytes]
    clinical: dict[str, Any]
    key: str
    profile: StudyProfile = field(default_factory=StudyProfile)


def described(spec: TaskSpec, instances: Sequence[bytes]) -> tuple[str, StudyProfile]:
    """The key and the profile the preprocess model computes for these instances, by its
    own decoding and rules (the key: the sorted SOP Instance UIDs, or the bytes' digest
    where one has none)."""
    from abdoserve.preprocessing.decode import decode_instance
    from abdoserve.preprocessing.study import study_key as served_key

    decoded = [decode_instance(data, index, spec.limits) for index, data in enumerate(instances)]
    profile = study_profile(
        [item.header for item in decoded],
        [frame for item in decoded for frame in item.frames],
        ct=spec.modality == "CT",
    )
    return served_key(decoded, instances), profile


def read_cohort(spec: TaskSpec, studies: Path, rows: Sequence[Mapping[str, str]]) -> list[Study]:
    from abdoserve_client.instances import folder_files, folder_request, load_instances

    cohort = []
    for row in rows:
        folder = studies / row["study"]
        if not folder.is_dir():
            raise FileNotFoundError(f"labels name study {row['study']!r}: no folder {folder}")
        instances = load_instances(folder_files(folder))
        clinical = folder_request([folder])
        key, profile = described(spec, instances)
        cohort.append(Study(row["study"], instances, clinical, key, profile))
    return cohort


def read_thresholds(path: Path, task: str) -> dict[str, dict[str, float]]:
    thresholds = json.loads(path.read_text())
    if task not in thresholds:
        raise ValueError(f"{path} has no thresholds for {task}")
    found: dict[str, dict[str, float]] = thresholds[task]
    return found


def judge(report: AcceptanceReport, thresholds: Mapping[str, Mapping[str, float]]) -> Verdict:
    """Each threshold on its metric's point estimate (the CI is in the report beside it)."""
    lines, passed = [], True
    for name, bound in sorted(thresholds.items()):
        value = report.estimate(name).value
        for kind, limit in bound.items():
            ok = math.isfinite(value) and (value >= limit if kind == "min" else value <= limit)
            passed &= ok
            sign = ">=" if kind == "min" else "<="
            lines.append(f"{name} {value:.3f} {sign} {limit:g}: {'pass' if ok else 'FAIL'}")
    return Verdict(passed, tuple(lines))


def with_validation(current: Routing, version: int, keys: Sequence[str]) -> Routing:
    if current.validating is not None:
        raise VersionError(f"version {current.validating} is being validated: wait for it")
    return current.changed(
        validating=version,
        validation_keys=tuple(sorted(set(keys))),
        reason=f"validating version {version}",
    )


def without_validation(current: Routing, verdict: str | None = None) -> Routing:
    """The cohort's routing removed; the verdict, where there is one, recorded for
    `promote` (an interrupted validation records none)."""
    if verdict is None or current.validating is None:
        return current.changed(validating=None, validation_keys=(), reason="validation ended")
    version = current.validating
    accepted = tuple(sorted({**dict(current.acceptance), version: verdict}.items()))
    return current.changed(
        validating=None,
        validation_keys=(),
        acceptance=accepted,
        reason=f"version {version} validated: {verdict}",
    )


def answers_of(
    ask: Callable[[Study], Mapping[str, Any]], cohort: Sequence[Study], version: int
) -> dict[str, Mapping[str, Any]]:
    """Each study's answer from `version`; a study answered by another version (a
    replica still loading the change) is asked again until the timeout."""
    deadline = time.monotonic() + ADOPTION_TIMEOUT_S
    answers: dict[str, Mapping[str, Any]] = {}
    waiting = list(cohort)
    while waiting:
        late = []
        for study in waiting:
            answer = ask(study)
            if str(answer.get("model", {}).get("version")) == str(version):
                answers[study.name] = answer
            else:
                late.append(study)
        if late and time.monotonic() > deadline:
            raise VersionError(
                f"{len(late)} studies were still answered by another version after "
                f"{ADOPTION_TIMEOUT_S:.0f} s: is every replica's supervisor running?"
            )
        if late:
            time.sleep(1.0)
        waiting = late
    return answers


def validate(
    control: VersionControl,
    ask: Callable[[Study], Mapping[str, Any]],
    spec: TaskSpec,
    version: int,
    *,
    studies: Path,
    labels: Path,
    out: Path,
    thresholds: Path = THRESHOLDS_FILE,
) -> tuple[AcceptanceReport, Verdict, Path]:
    rows = read_labels(labels, spec.name)
    cohort = read_cohort(spec, studies, rows)
    bounds = read_thresholds(thresholds, spec.name)
    control.apply(spec.name, lambda r, _: with_validation(r, version, [s.key for s in cohort]))
    verdict = None
    try:
        answers = answers_of(ask, cohort, version)
        report = report_from_answers(spec, answers, rows)
        verdict = judge(report, bounds)
    finally:
        passed = None if verdict is None else ("passed" if verdict.passed else "failed")
        control.apply(spec.name, lambda r, _: without_validation(r, passed))
    results = [answers[row["study"]]["result"] for row in rows]
    path = write_report(
        out, spec, version=version, report=report, verdict=verdict.lines, rows=rows, results=results
    )
    write_drift_reference(out, spec, version, cohort, answers)
    return report, verdict, path


def write_drift_reference(
    out: Path,
    spec: TaskSpec,
    version: int,
    cohort: Sequence[Study],
    answers: Mapping[str, Mapping[str, Any]],
) -> Path:
    """What the cohort looked like and what the version answered it, binned as the
    server bins live traffic: the baseline the supervisor's drift watch compares with."""
    bins = [
        study_bins(spec.output, study.profile, answered_value(spec, answers[study.name]))
        for study in cohort
    ]
    path = out / REFERENCE_FILE
    document = reference(spec.name, version, spec.output, bins)
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def answered_value(spec: TaskSpec, answer: Mapping[str, Any]) -> Any:
    """The answer's class or value as the study array `study_bins` reads."""
    import numpy as np

    result = answer["result"]
    output = spec.output
    if answer_feature(output).categories:
        study = np.zeros(len(output.labels), dtype=np.float32)
        study[output.labels.index(result["label"])] = 1.0
        return study
    return np.asarray([float(result[output.labels[0]])], dtype=np.float32)


def acceptance_record(
    report: AcceptanceReport, verdict: Verdict, studies: Path, labels: Path, thresholds: Path
) -> dict[str, Any]:
    """What the model card's `acceptance` holds."""
    return {
        "validated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "studies": report.studies,
        "cohort": str(studies),
        "labels_sha256": hashlib.sha256(labels.read_bytes()).hexdigest(),
        "thresholds": str(thresholds),
        "passed": verdict.passed,
        "verdict": list(verdict.lines),
        "report": report.to_dict(),
    }
