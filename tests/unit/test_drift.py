"""Drift: the study profile, its bins, what the server records, the acceptance cohort's
reference and the supervisor's window against it (abdoserve.preprocessing.study_profile,
abdoserve.serving.drift, abdoserve.serving.drift_metrics, abdoserve.deploy.drift_watch)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pydicom
import pytest

from abdoserve.deploy.drift_watch import (
    DriftBounds,
    DriftWatch,
    References,
    feature_counts,
    read_reference,
)
from abdoserve.deploy.rollback_watch import parse_metrics
from abdoserve.export.phantom import build_study
from abdoserve.preprocessing.errors import IntakeError
from abdoserve.preprocessing.study import StudyPreparer
from abdoserve.preprocessing.study_profile import (
    MANUFACTURERS,
    StudyProfile,
    instance_header,
    vendor,
)
from abdoserve.preprocessing.tasks import get_task
from abdoserve.serving.drift import answer_feature, features, reference, study_bins
from abdoserve.serving.drift_bins import REFERENCE_FILE, stability_index
from abdoserve.serving.drift_metrics import DriftMetrics

BONE = get_task("bone_density_ct")
MASS = get_task("liver_mass_ct")
PATIENT_NAME = "Doe^Jane"


# --- the profile ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("GE MEDICAL SYSTEMS", "ge"),
        ("GE", "ge"),
        ("SIEMENS", "siemens"),
        ("Philips Medical Systems", "philips"),
        ("TOSHIBA", "canon"),
        ("Canon Medical Systems", "canon"),
        ("Hitachi Medical Corporation", "fujifilm"),
        ("UIH", "united_imaging"),
        ("AbdoServe", "other"),
        (PATIENT_NAME, "other"),
        ("", "missing"),
        (None, "missing"),
    ],
)
def test_a_vendor_is_one_of_a_fixed_vocabulary(written: str | None, expected: str) -> None:
    assert vendor(written) == expected
    assert expected in MANUFACTURERS


def test_a_malformed_kvp_is_missing_not_a_refusal() -> None:
    study = build_study("bone_density_ct", seed=1)
    dataset = pydicom.dcmread(pydicom.filebase.DicomBytesIO(study.instances[0]))
    assert instance_header(dataset).kvp == 120.0
    dataset.KVP = None
    assert instance_header(dataset).kvp is None
    dataset.Manufacturer = PATIENT_NAME
    assert instance_header(dataset).manufacturer == "other"


def test_the_profile_reads_kvp_thickness_spacing_and_the_body_in_hounsfield_units() -> None:
    study = build_study("bone_density_ct", seed=2)
    profile = StudyPreparer(BONE)(study.instances, study.clinical).profile
    first = pydicom.dcmread(pydicom.filebase.DicomBytesIO(study.instances[0]))
    assert profile.manufacturer == "other"  # the phantom's "AbdoServe"
    assert profile.kvp == 120.0
    assert profile.slice_thickness_mm == pytest.approx(float(first.SliceThickness))
    assert profile.pixel_spacing_mm == pytest.approx(float(np.mean(first.PixelSpacing)))
    # Soft tissue, fat and bone together: a body's mean lies between fat and bone.
    assert profile.body_hu is not None and -150.0 < profile.body_hu < 300.0


def test_a_profile_crosses_study_info_as_json_and_back() -> None:
    profile = StudyProfile("siemens", 100.0, 1.0, 0.7, 40.1234)
    again = StudyProfile.from_json(json.loads(json.dumps(profile.to_json())))
    assert again == replace(profile, body_hu=40.123)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"manufacturer": PATIENT_NAME}, "'manufacturer' must be one of"),
        ({"kvp": "120"}, "'kvp' must be a finite number or null"),
        ({"body_hu": True}, "'body_hu' must be a finite number or null"),
        ({"extra": 1}, "'profile' must be an object with keys"),
    ],
)
def test_a_profile_a_direct_caller_made_up_is_refused_by_name(
    change: dict[str, Any], named: str
) -> None:
    value = {**StudyProfile().to_json(), **change}
    with pytest.raises(IntakeError, match=named) as refused:
        StudyProfile.from_json(value)
    assert PATIENT_NAME not in str(refused.value)


# --- bins -------------------------------------------------------------------------------


def test_a_value_falls_in_the_bin_a_prometheus_histogram_counts_it_in() -> None:
    [kvp] = [feature for feature in features(BONE.output) if feature.name == "kvp"]
    assert kvp.edges[:2] == (70, 80)
    assert kvp.bin_of(70.0) == 0  # le="70" counts a value equal to its bound
    assert kvp.bin_of(70.5) == 1
    assert kvp.bin_of(1000.0) == len(kvp.edges)  # +Inf
    assert kvp.bin_of(None) == len(kvp.edges) + 1  # missing
    assert kvp.bins == len(kvp.edges) + 2


def test_the_answer_is_binned_by_class_or_by_tenths_of_the_output_range() -> None:
    mass = answer_feature(MASS.output)
    assert mass.categories == ("A", "B", "C", "D", "E")
    bone = answer_feature(BONE.output)
    assert bone.edges[0] == pytest.approx(0.38) and len(bone.edges) == 9


def test_the_stability_index_is_zero_for_the_same_shares_and_known_for_a_shift() -> None:
    assert stability_index([10, 20, 30, 0], [20, 40, 60, 0]) == 0.0
    e, o = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    by_hand = (o[0] - e[0]) * math.log(o[0] / e[0]) + (o[1] - e[1]) * math.log(o[1] / e[1])
    assert stability_index([50, 50], [90, 10]) == pytest.approx(by_hand)
    assert by_hand > 0.25
    # A bin the cohort never filled counts from a share of 0.001.
    filled = (0.2 - 0.001) * math.log(0.2 / 0.001) + (0.8 - 1.0) * math.log(0.8 / 1.0)
    assert stability_index([10, 0], [8, 2]) == pytest.approx(filled)


# --- what the server records, read back as the supervisor reads it ----------------------


@dataclass
class ExposedMetric:
    labels: dict[str, str]
    buckets: list[float] | None
    values: list[float] = field(default_factory=list)

    def observe(self, value: float) -> None:
        self.values.append(value)

    def increment(self, value: float) -> None:
        self.values.append(value)


class ExposingFamily:
    """pb_utils.MetricFamily that writes /metrics text as Triton does (cumulative buckets)."""

    HISTOGRAM = "histogram"
    COUNTER = "counter"
    families: ClassVar[list[ExposingFamily]] = []

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name, self.kind = name, kind
        self.metrics: list[ExposedMetric] = []
        ExposingFamily.families.append(self)

    def Metric(self, labels: dict[str, str], buckets: list[float] | None = None) -> ExposedMetric:
        metric = ExposedMetric(labels, buckets)
        self.metrics.append(metric)
        return metric

    def text(self) -> str:
        lines = [f"# TYPE {self.name} {self.kind}"]
        for metric in self.metrics:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(metric.labels.items()))
            if metric.buckets is None:
                lines.append(f"{self.name}{{{labels}}} {sum(metric.values)}")
                continue
            for bound in [*metric.buckets, math.inf]:
                count = sum(value <= bound for value in metric.values)
                le = "+Inf" if bound == math.inf else repr(float(bound))
                lines.append(f'{self.name}_bucket{{{labels},le="{le}"}} {count}')
            lines.append(f"{self.name}_count{{{labels}}} {len(metric.values)}")
            lines.append(f"{self.name}_sum{{{labels}}} {sum(metric.values)}")
        return "\n".join(lines) + "\n"


class ExposingPbUtils:
    MetricFamily = ExposingFamily


def exposition() -> str:
    return "".join(family.text() for family in ExposingFamily.families)


def profiles(count: int, kvp: float = 120.0, manufacturer: str = "siemens") -> list[StudyProfile]:
    return [
        StudyProfile(
            manufacturer=manufacturer,
            kvp=kvp,
            slice_thickness_mm=(1.0, 2.5, 5.0)[number % 3],
            pixel_spacing_mm=0.6 + 0.05 * (number % 5),
            body_hu=None if number % 7 == 0 else -120.0 + 15.0 * (number % 11),
        )
        for number in range(count)
    ]


def bone_values(count: int) -> list[np.ndarray]:
    return [np.array([0.5 + 0.9 * number / count], np.float32) for number in range(count)]


@pytest.fixture
def server() -> DriftMetrics:
    ExposingFamily.families = []
    return DriftMetrics(ExposingPbUtils(), BONE.name, BONE.output)


def test_what_the_server_counts_reads_back_as_the_cohorts_reference(server: DriftMetrics) -> None:
    studies = list(zip(profiles(30), bone_values(30), strict=True))
    for profile, study in studies:
        server.observe(2, profile, study)
    samples = parse_metrics(exposition())
    expected = reference(
        BONE.name, 2, BONE.output, [study_bins(BONE.output, p, s) for p, s in studies]
    )
    assert expected["studies"] == 30
    for feature in features(BONE.output):
        counts = feature_counts(samples, BONE.name, "2", feature)
        document = expected["features"][feature.name]  # type: ignore[index]
        assert list(counts) == document["counts"], feature.name
    # Nothing under another version, and no label a header wrote.
    assert not feature_counts(samples, BONE.name, "1", answer_feature(BONE.output)).any()


def write_reference(repository: Path, version: str, studies: list[Any]) -> Path:
    folder = repository / f"{BONE.name}_net" / version
    folder.mkdir(parents=True)
    document = reference(
        BONE.name, int(version), BONE.output, [study_bins(BONE.output, p, s) for p, s in studies]
    )
    (folder / REFERENCE_FILE).write_text(json.dumps(document))
    return folder / REFERENCE_FILE


def test_the_window_departs_from_the_cohort_only_where_the_traffic_changed(
    server: DriftMetrics, tmp_path: Path
) -> None:
    cohort = list(zip(profiles(40), bone_values(40), strict=True))
    write_reference(tmp_path, "1", cohort)
    watch = DriftWatch(DriftBounds(window_s=60.0, min_studies=30), References(tmp_path))
    for profile, study in cohort[:20]:
        server.observe(1, profile, study)
    assert watch.update(parse_metrics(exposition()), now=0.0) == []  # 20 < min_studies
    for profile, study in cohort[20:]:
        server.observe(1, profile, study)
    alike = {f.feature: f.index for f in watch.update(parse_metrics(exposition()), now=10.0)}
    assert set(alike) == {feature.name for feature in features(BONE.output)}
    assert max(alike.values()) == 0.0, alike  # the cohort itself
    # The same studies again, from a scanner set to 80 kV by another vendor.
    for profile, study in cohort:
        server.observe(1, replace(profile, kvp=80.0, manufacturer="philips"), study)
    shifted = {f.feature: f for f in watch.update(parse_metrics(exposition()), now=20.0)}
    assert shifted["kvp"].index > 0.25 and shifted["manufacturer"].index > 0.25
    # Twice the studies in the same shares.
    assert max(shifted[name].index for name in ("answer", "body_hu", "pixel_spacing_mm")) == 0.0
    assert shifted["kvp"].studies == 80
    # A minute on, the window holds the shifted studies alone.
    for profile, study in cohort[:30]:
        server.observe(1, replace(profile, kvp=80.0, manufacturer="philips"), study)
    later = {f.feature: f for f in watch.update(parse_metrics(exposition()), now=75.0)}
    assert later["kvp"].studies == 70  # since the point at 10 s, the window's base


def test_a_version_without_a_reference_or_with_a_bad_one_has_no_index(
    server: DriftMetrics, tmp_path: Path
) -> None:
    for profile, study in zip(profiles(40), bone_values(40), strict=True):
        server.observe(3, profile, study)
    watch = DriftWatch(DriftBounds(min_studies=10), References(tmp_path))
    assert watch.update(parse_metrics(exposition()), now=0.0) == []
    path = write_reference(tmp_path, "3", [(StudyProfile(), bone_values(1)[0])])
    assert read_reference(path) is not None
    document = json.loads(path.read_text())
    document["features"]["kvp"]["counts"] = [1, 2]
    path.write_text(json.dumps(document))
    assert read_reference(path) is None
    assert watch.update(parse_metrics(exposition()), now=1.0) == []


def test_a_restarted_server_starts_the_window_again(server: DriftMetrics, tmp_path: Path) -> None:
    cohort = list(zip(profiles(20), bone_values(20), strict=True))
    write_reference(tmp_path, "1", cohort)
    watch = DriftWatch(DriftBounds(min_studies=10), References(tmp_path))
    for profile, study in cohort:
        server.observe(1, profile, study)
    assert watch.update(parse_metrics(exposition()), now=0.0)[0].studies == 20
    ExposingFamily.families = []
    restarted = DriftMetrics(ExposingPbUtils(), BONE.name, BONE.output)
    for profile, study in cohort[:12]:
        restarted.observe(1, profile, study)
    assert watch.update(parse_metrics(exposition()), now=5.0)[0].studies == 12
