"""Gateway routing rules: real phantom headers routed by the example file and by
hand-made rules; every mistake in a rules file refused with file, rule and field."""

from __future__ import annotations

import copy
import io
import json
import logging
import struct
import warnings
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from abdoserve.deploy.gateway.routing import (
    RoutedRequest,
    RulesError,
    RuleSet,
    StudyRouting,
    load_rules,
    patient_age,
)
from abdoserve.deploy.gateway.selection import nearest_in_order
from abdoserve.export.phantom.studies import build_study
from abdoserve.preprocessing.specs import with_overrides
from abdoserve.preprocessing.tasks import TASKS

EXAMPLE = Path(__file__).parents[2] / "deploy" / "gateway" / "rules.example.yaml"
Series = dict[str, list[Dataset]]

# The bone phantom with 15 slices: z of instances 1..15 (three per vertebra, L1 down).
BONE_Z = [-33, -40, -47, -69, -76, -83, -105, -112, -119, -141, -148, -155, -177, -184, -191]


# --- phantoms and rules files ----------------------------------------------------------


@cache
def phantom_files(task: str, seed: int = 0, **options: Any) -> tuple[bytes, ...]:
    return build_study(task, seed=seed, **options).instances


def read(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def by_series(files: Sequence[bytes]) -> Series:
    """Series Instance UID -> headers, as the gateway hands them to routing."""
    series: Series = {}
    for data in files:
        ds = read(data)
        series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return series


def headers(task: str, seed: int = 0, **options: Any) -> Series:
    return by_series(phantom_files(task, seed, **options))


def set_raw(ds: Dataset, keyword: str, text: str) -> None:
    """Set an element as read from a file, unconverted: pydicom would refuse or warn
    about a malformed value (61Y) when setting it."""
    tag = Tag(keyword)
    value = text.encode("latin-1")
    ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)


def only(series: Series) -> list[Dataset]:
    (datasets,) = series.values()
    return datasets


def z_of(series: Series, instances: Sequence[str]) -> list[float]:
    """The z (mm) of the chosen instances, in their order."""
    where = {
        str(ds.SOPInstanceUID): float(ds.ImagePositionPatient[2])
        for datasets in series.values()
        for ds in datasets
    }
    return [where[uid] for uid in instances]


def write_rules(tmp_path: Path, *rules: Any, suffix: str = ".yaml") -> Path:
    path = tmp_path / f"rules{suffix}"
    document = {"rules": list(rules)}
    if suffix == ".json":
        path.write_text(json.dumps(document))
    else:
        path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def rule(name: str = "r", task: str = "bone_density_ct", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": name,
        "task": task,
        "match": {"Modality": TASKS[task].modality if task in TASKS else "CT"},
        "select": {"method": "all"},
    }
    body.update(fields)
    return body


def ruleset(tmp_path: Path, *rules: Any) -> RuleSet:
    return load_rules(write_rules(tmp_path, *rules))


def route_one(rules: RuleSet, series: Series) -> RoutedRequest:
    routing = rules.route_study(series)
    assert routing.unmatched == ()
    (request,) = routing.requests
    return request


@pytest.fixture(scope="module")
def example() -> RuleSet:
    return load_rules(EXAMPLE)


# --- the example file routes every phantom, and only to its own task --------------------

EXAMPLE_RULES = {
    "liver_mass_ct": "liver-mass-dynamic-ct",
    "bone_density_ct": "bone-density-ct",
    "esophageal_cancer_ct": "esophageal-cancer-ct",
    "liver_fibrosis_ct": "liver-fibrosis-portal-venous-ct",
    "liver_fibrosis_mri": "liver-fibrosis-hbp-mri",
}


def test_the_example_names_one_rule_per_task(example: RuleSet) -> None:
    assert {item.task.name: item.name for item in example.rules} == EXAMPLE_RULES
    assert set(EXAMPLE_RULES) == set(TASKS)


def test_example_bone_density_nine_evenly_spaced_head_first(example: RuleSet) -> None:
    series = headers("bone_density_ct", slices=15)
    request = route_one(example, series)
    assert request.rule == "bone-density-ct"
    assert request.task == "bone_density_ct"
    assert request.series_uids == tuple(series)
    # targets -33, -52.75, -72.5, ... -191 (19.75 mm apart); ties go to the cranial slice
    assert z_of(series, request.instances) == [-33, -47, -69, -83, -112, -141, -148, -177, -191]
    assert (request.clinical, request.missing, request.problem) == ({}, (), None)


def test_example_esophageal_cancer_sends_every_slice_head_first(example: RuleSet) -> None:
    series = headers("esophageal_cancer_ct")
    request = route_one(example, series)
    assert request.task == "esophageal_cancer_ct"
    assert z_of(series, request.instances) == [110, 100, 90, 80, 70, 60, 50, 40]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_example_fibrosis_ct_reads_age_and_sex(example: RuleSet, seed: int) -> None:
    series = headers("liver_fibrosis_ct", seed)
    request = route_one(example, series)
    assert request.task == "liver_fibrosis_ct"
    assert z_of(series, request.instances) == [10.0, -23.33, -56.67, -90.0]
    study = build_study("liver_fibrosis_ct", seed=seed)
    assert request.clinical == study.clinical  # the phantom's own age and sex
    assert request.missing == ()


def test_example_fibrosis_mri_three_levels_and_field_strength(example: RuleSet) -> None:
    series = headers("liver_fibrosis_mri", field_strength=1.5)
    request = route_one(example, series)
    assert request.task == "liver_fibrosis_mri"
    assert z_of(series, request.instances) == [20.0, -30.0, -80.0]  # cranial, middle, caudal
    assert request.clinical == {"field_strength": 1.5}
    assert request.missing == ("hbv", "hcv")  # no header holds them: never guessed
    assert json.loads(json.dumps(request.clinical)) == request.clinical


@pytest.mark.parametrize("shuffle", [False, True])
def test_example_liver_mass_three_phases_in_acquisition_order(
    example: RuleSet, shuffle: bool
) -> None:
    study = build_study("liver_mass_ct", seed=0, shuffle=shuffle)
    series = by_series(study.instances)
    request = route_one(example, series)
    assert request.task == "liver_mass_ct"
    phases = {item["sop_instance_uid"]: item["phase"] for item in study.truth["instances"]}
    assert [phases[uid] for uid in request.instances] == ["non_contrast", "arterial", "delayed"]
    assert phase_descriptions(series, request) == [
        "Liver non-contrast",
        "Liver arterial phase",
        "Liver delayed phase",
    ]
    assert z_of(series, request.instances) == [-20.0, -20.0, -20.0]
    # No header holds the mass's ROI: the study needs input, nothing is guessed.
    assert (request.clinical, request.missing, request.problem) == ({}, ("roi",), None)


def test_example_routes_all_phantoms_in_one_study(example: RuleSet) -> None:
    merged: Series = {}
    expected: dict[str, str] = {}
    for task in TASKS:
        for uid, datasets in headers(task).items():
            merged[uid] = datasets
            expected[uid] = task
    routing = example.route_study(merged)
    assert routing.unmatched == ()
    assert {uid: item.task for item in routing.requests for uid in item.series_uids} == expected
    assert [item.task for item in routing.requests] == list(EXAMPLE_RULES)  # file order


@pytest.mark.parametrize("task", sorted(EXAMPLE_RULES))
def test_no_other_rule_takes_a_phantom(tmp_path: Path, task: str) -> None:
    """Without its own rule, a phantom is unmatched: no other task's rule admits it."""
    document = yaml.safe_load(EXAMPLE.read_text())
    others = [item for item in document["rules"] if item["task"] != task]
    series = headers(task)
    routing = ruleset(tmp_path, *others).route_study(series)
    assert routing == StudyRouting((), tuple(series))


def test_the_example_as_json_routes_the_same(tmp_path: Path, example: RuleSet) -> None:
    path = write_rules(tmp_path, *yaml.safe_load(EXAMPLE.read_text())["rules"], suffix=".json")
    series = headers("bone_density_ct", slices=15)
    assert load_rules(path).route_study(series) == example.route_study(series)


def test_arrival_order_does_not_change_the_routing(example: RuleSet) -> None:
    series = headers("bone_density_ct", slices=15)
    reordered = {uid: list(reversed(datasets)) for uid, datasets in series.items()}
    assert example.route_study(reordered) == example.route_study(series)


def test_matching_rule_answers_for_one_header(example: RuleSet) -> None:
    """The SCP asks per instance, before storing it."""
    assert example.matching_rule(only(headers("liver_fibrosis_mri"))[0]) == "liver-fibrosis-hbp-mri"
    localizer = copy.deepcopy(only(headers("bone_density_ct"))[0])
    localizer.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert example.matching_rule(localizer) is None


# --- first match, unmatched, criteria --------------------------------------------------


def test_first_matching_rule_wins(tmp_path: Path) -> None:
    series = headers("bone_density_ct", slices=15)
    first = rule("first", select={"method": "evenly_spaced", "count": 2})
    second = rule("second", task="esophageal_cancer_ct")
    assert route_one(ruleset(tmp_path, first, second), series).rule == "first"
    assert route_one(ruleset(tmp_path, second, first), series).task == "esophageal_cancer_ct"


def test_unmatched_series_are_listed(tmp_path: Path) -> None:
    series = {**headers("bone_density_ct"), **headers("liver_fibrosis_mri")}
    mri_uid = next(iter(headers("liver_fibrosis_mri")))
    routing = ruleset(tmp_path, rule()).route_study(series)
    assert routing.unmatched == (mri_uid,)
    assert [item.task for item in routing.requests] == ["bone_density_ct"]


def test_a_series_without_instances_is_unmatched(tmp_path: Path) -> None:
    assert ruleset(tmp_path, rule()).route_study({"1.2.3": []}) == StudyRouting((), ("1.2.3",))


def matched(tmp_path: Path, match: dict[str, Any], datasets: Sequence[Dataset]) -> bool:
    rules = ruleset(tmp_path, rule(match=match))
    return not rules.route_study({"1.2.3": list(datasets)}).unmatched


@pytest.mark.parametrize(
    ("match", "admits"),
    [
        ({"Modality": "CT"}, True),
        ({"Modality": ["CT"]}, True),
        ({"BodyPartExamined": "abd*"}, True),
        ({"BodyPartExamined": ["chest", "*spine*"]}, False),
        ({"SeriesDescription": "ABDOMEN NON-CONTRAST"}, True),  # case-insensitive
        ({"SeriesDescription": ["*chest*", "abdomen non-?ontrast"]}, True),
        ({"SeriesDescription": "*contrast"}, True),
        ({"SeriesDescription": "abdomen"}, False),  # a glob matches the whole text
        ({"ImageType": {"includes": ["primary", "axial"]}}, True),
        ({"ImageType": {"includes": ["PRIMARY", "DERIVED"]}}, False),
        ({"ImageType": {"excludes": ["LOCALIZER"]}}, True),
        ({"ImageType": {"excludes": ["ORIG*"]}}, False),
        ({"contrast": False}, True),
        ({"contrast": True}, False),
        ({"SliceThickness": {"min": 5, "max": 5}}, True),
        ({"SliceThickness": {"max": 3}}, False),
        ({"SliceThickness": {"min": 5.5}}, False),
        ({"Modality": "CT", "contrast": True}, False),  # every criterion must hold
        ({"Modality": "CT", "contrast": False, "BodyPartExamined": "ABDOMEN"}, True),
    ],
)
def test_match_criteria(tmp_path: Path, match: dict[str, Any], admits: bool) -> None:
    assert matched(tmp_path, match, only(headers("bone_density_ct"))) is admits


@pytest.mark.parametrize(
    ("agent", "contrast"),
    [("iopamidol 370 mgI/mL", True), ("NONE", False), ("no", False), ("", False), (None, False)],
)
def test_contrast_is_an_agent_not_a_none_word(
    tmp_path: Path, agent: str | None, contrast: bool
) -> None:
    datasets = copy.deepcopy(only(headers("liver_fibrosis_ct")))
    for ds in datasets:
        if agent is None:
            del ds.ContrastBolusAgent
        else:
            ds.ContrastBolusAgent = agent
    assert matched(tmp_path, {"contrast": True}, datasets) is contrast
    assert matched(tmp_path, {"contrast": False}, datasets) is not contrast


@pytest.mark.parametrize(
    "match",
    [
        {"BodyPartExamined": "*"},
        {"SeriesDescription": "*"},
        {"ImageType": {"excludes": ["LOCALIZER"]}},
        {"SliceThickness": {"min": 0}},
        {"Modality": "CT"},
    ],
)
def test_a_missing_attribute_fails_its_criterion(tmp_path: Path, match: dict[str, Any]) -> None:
    datasets = copy.deepcopy(only(headers("bone_density_ct")))
    keyword = next(iter(match))
    for ds in datasets:
        delattr(ds, keyword)
    assert not matched(tmp_path, match, datasets)


def test_matching_reads_the_lowest_instance_number(tmp_path: Path) -> None:
    datasets = copy.deepcopy(only(headers("bone_density_ct")))
    for ds in datasets:
        if ds.InstanceNumber != 1:
            ds.SeriesDescription = "something else"
    assert matched(tmp_path, {"SeriesDescription": "abdomen*"}, datasets)
    assert matched(tmp_path, {"SeriesDescription": "abdomen*"}, list(reversed(datasets)))


# --- selection -------------------------------------------------------------------------


def select(
    tmp_path: Path, series: Series, task: str = "bone_density_ct", **how: Any
) -> RoutedRequest:
    return route_one(ruleset(tmp_path, rule(task=task, select=how)), series)


def test_all_sends_every_slice_head_first(tmp_path: Path) -> None:
    series = headers("bone_density_ct", slices=15)
    request = select(tmp_path, series, method="all")
    assert z_of(series, request.instances) == BONE_Z


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ({"count": 1}, [-112]),  # the middle of -33..-191
        ({"count": 2}, [-33, -191]),
        ({"count": 15}, BONE_Z),
        ({"count": 32}, BONE_Z),  # all of them when the series has fewer
        # within -150..-40: -40 ... -148; targets -40, -67, -94, -121, -148
        ({"count": 5, "z_range": [-150, -40]}, [-40, -69, -83, -119, -148]),
        ({"count": 3, "z_range": [-100, 0]}, [-33, -47, -83]),
    ],
)
def test_evenly_spaced(tmp_path: Path, how: dict[str, Any], expected: list[float]) -> None:
    series = headers("bone_density_ct", slices=15)
    request = select(tmp_path, series, method="evenly_spaced", **how)
    assert z_of(series, request.instances) == expected
    assert len(set(request.instances)) == len(request.instances)


def test_evenly_spaced_outside_the_series_is_a_problem(tmp_path: Path) -> None:
    series = headers("bone_density_ct", slices=15)
    request = select(tmp_path, series, method="evenly_spaced", count=9, z_range=[0, 30])
    assert request.instances == ()
    assert request.problem == "needs 1 image, series has 0 within z 0..30 mm"


@pytest.mark.parametrize(
    ("fractions", "expected"),
    [
        (None, [-69, -112, -148]),  # targets -72.5, -112, -151.5: ties go cranial
        ([0.0, 1.0], [-33, -191]),
        ([0.0, 0.01, 0.02], [-33, -40, -47]),  # distinct slices, in order
    ],
)
def test_levels(tmp_path: Path, fractions: list[float] | None, expected: list[float]) -> None:
    series = headers("bone_density_ct", slices=15)
    how: dict[str, Any] = {"method": "levels"}
    if fractions is not None:
        how["fractions"] = fractions
    request = select(tmp_path, series, **how)
    assert z_of(series, request.instances) == expected


def test_too_few_images_is_a_problem_not_a_request(tmp_path: Path) -> None:
    series = headers("liver_fibrosis_mri")
    uid = next(iter(series))
    two = {uid: sorted(series[uid], key=lambda ds: int(ds.InstanceNumber))[:2]}
    for method in ("levels", "all"):
        request = select(tmp_path, two, task="liver_fibrosis_mri", method=method)
        assert request.instances == ()
        assert request.problem == "needs 3 images, series has 2"
        assert request.series_uids == (uid,)


def test_unusable_instances_are_counted_in_the_problem(tmp_path: Path) -> None:
    datasets = copy.deepcopy(only(headers("liver_fibrosis_mri")))
    del datasets[0].ImagePositionPatient
    request = select(tmp_path, {"1.2.3": datasets}, task="liver_fibrosis_mri", method="levels")
    assert request.problem == "needs 3 images, series has 2 (1 without a usable position)"


def test_all_over_the_task_maximum_is_a_problem_not_a_cut(tmp_path: Path) -> None:
    bone = with_overrides(TASKS["bone_density_ct"], {"images.max_images": 10})
    path = write_rules(tmp_path, rule())
    rules = load_rules(path, tasks={**TASKS, "bone_density_ct": bone})
    request = route_one(rules, headers("bone_density_ct", slices=15))
    assert request.instances == ()
    assert request.problem == (
        "series has 15 images, the task takes at most 10: select evenly_spaced or narrow z_range"
    )


def test_localizers_repeats_and_other_orientations_are_left_out(tmp_path: Path) -> None:
    datasets = copy.deepcopy(only(headers("bone_density_ct", slices=15)))
    localizer = copy.deepcopy(datasets[0])
    localizer.SOPInstanceUID = "1.2.3.4.1"
    localizer.InstanceNumber = 99
    localizer.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
    repeat = copy.deepcopy(next(ds for ds in datasets if ds.InstanceNumber == 5))
    repeat.SOPInstanceUID = "1.2.3.4.2"
    repeat.InstanceNumber = 50  # same position as instance 5: the lower number stays
    twice = copy.deepcopy(datasets[1])  # one instance received twice
    series = {"1.2.3": [*datasets, localizer, repeat, twice]}
    request = select(tmp_path, series, method="all")
    assert z_of(series, request.instances) == BONE_Z
    fifth = next(ds for ds in datasets if ds.InstanceNumber == 5)
    assert fifth.SOPInstanceUID in request.instances
    assert "1.2.3.4.2" not in request.instances


def test_z_follows_the_head_whatever_the_normal(tmp_path: Path) -> None:
    """A row x column normal pointing to the feet is flipped: head first all the same."""
    datasets = copy.deepcopy(only(headers("esophageal_cancer_ct")))
    for ds in datasets:
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]  # normal (0, 0, -1)
    request = select(tmp_path, {"1.2.3": datasets}, task="esophageal_cancer_ct", method="all")
    assert z_of({"1.2.3": datasets}, request.instances) == [110, 100, 90, 80, 70, 60, 50, 40]


def test_nearest_in_order_is_distinct_ordered_and_cranial_on_ties() -> None:
    assert nearest_in_order([10, 9, 8, 0], [10, 9.4]) == [0, 1]
    assert nearest_in_order([10, 0, -10], [1, -1]) == [0, 1]  # both want 0: the tie goes up
    assert nearest_in_order([10, 0, -10], [0.5, 0, -0.5]) == [0, 1, 2]


# --- phases across series --------------------------------------------------------------

PHASES = {"method": "phases", "count": 3}
LIVER = {"Modality": "CT", "SeriesDescription": "liver*"}


def phase_rule(**select: Any) -> dict[str, Any]:
    return rule(
        "mass", task="liver_mass_ct", scope="study", match=LIVER, select={**PHASES, **select}
    )


def liver_mass_stack(offsets: Sequence[float] = (-10, -5, 5, 10)) -> Series:
    """The dynamic liver phantom, each phase grown to slices at z = -20 + offsets too."""
    series = copy.deepcopy(headers("liver_mass_ct"))
    for datasets in series.values():
        (original,) = datasets
        for number, offset in enumerate(offsets, start=2):
            ds = copy.deepcopy(original)
            ds.SOPInstanceUID = f"1.2.3.{original.SeriesNumber}.{number}"
            ds.InstanceNumber = number
            x, y, z = (float(value) for value in original.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y, z + offset]
            datasets.append(ds)
    return series


def phase_descriptions(series: Series, request: RoutedRequest) -> list[str]:
    return [str(series[uid][0].SeriesDescription) for uid in request.series_uids]


def test_phases_take_the_median_level_of_the_first_series(tmp_path: Path) -> None:
    series = liver_mass_stack()
    request = route_one(ruleset(tmp_path, phase_rule()), dict(reversed(series.items())))
    assert z_of(series, request.instances) == [-20, -20, -20]
    originals = {str(datasets[0].SOPInstanceUID) for datasets in series.values()}
    assert set(request.instances) == originals
    assert phase_descriptions(series, request) == [
        "Liver non-contrast",
        "Liver arterial phase",
        "Liver delayed phase",
    ]


def test_phases_at_a_given_z(tmp_path: Path) -> None:
    series = liver_mass_stack()
    request = route_one(ruleset(tmp_path, phase_rule(z_mm=-26)), series)
    assert z_of(series, request.instances) == [-25, -25, -25]


def test_phases_too_far_from_the_level_is_a_problem(tmp_path: Path) -> None:
    series = liver_mass_stack()
    request = route_one(ruleset(tmp_path, phase_rule(z_mm=-60)), series)
    first = request.series_uids[0]
    assert request.problem == f"series {first} has no slice within 5 mm of z -60 mm"
    assert request.instances == ()
    wide = route_one(ruleset(tmp_path, phase_rule(z_mm=-60, tolerance_mm=40)), series)
    assert z_of(series, wide.instances) == [-30, -30, -30]


def test_phases_order_by_series_number_without_acquisition_times(tmp_path: Path) -> None:
    series = copy.deepcopy(headers("liver_mass_ct"))
    for datasets in series.values():
        for ds in datasets:
            del ds.AcquisitionTime
            ds.SeriesNumber = 4 - int(ds.SeriesNumber)  # delayed 1, arterial 2, non-contrast 3
    request = route_one(ruleset(tmp_path, phase_rule()), series)
    assert phase_descriptions(series, request) == [
        "Liver delayed phase",
        "Liver arterial phase",
        "Liver non-contrast",
    ]


def test_phases_with_too_few_or_too_many_series(tmp_path: Path) -> None:
    series = headers("liver_mass_ct")
    two = dict(list(series.items())[:2])
    request = route_one(ruleset(tmp_path, phase_rule()), two)
    assert (request.problem, request.instances) == ("needs 3 series, 2 matched", ())
    assert set(request.series_uids) == set(two)
    extra = copy.deepcopy(series[next(iter(series))])
    for ds in extra:
        ds.SeriesInstanceUID = "1.2.3.9"
        ds.SOPInstanceUID = "1.2.3.9.1"
        ds.SeriesDescription = "Liver portal venous"
    request = route_one(ruleset(tmp_path, phase_rule()), {**series, "1.2.3.9": extra})
    assert request.problem == "needs 3 series, 4 matched: narrow the rule's match"


# --- clinical inputs -------------------------------------------------------------------

AGE_SEX = {"age": {"from": "PatientAge"}, "sex": {"from": "PatientSex"}}


def fibrosis(tmp_path: Path, clinical: dict[str, Any] | None, **header: Any) -> RoutedRequest:
    datasets = copy.deepcopy(only(headers("liver_fibrosis_ct")))
    for ds in datasets:
        for keyword, value in header.items():
            if value is None:
                delattr(ds, keyword)
            else:
                set_raw(ds, keyword, value)
    fields: dict[str, Any] = {"task": "liver_fibrosis_ct"}
    if clinical is not None:
        fields["clinical"] = clinical
    return route_one(ruleset(tmp_path, rule(**fields)), {"1.2.3": datasets})


def test_inputs_in_neither_place_are_missing(tmp_path: Path) -> None:
    request = fibrosis(tmp_path, None)
    assert (request.clinical, request.missing) == ({}, ("age", "sex"))
    assert request.instances  # images are ready: only the inputs are wanted


@pytest.mark.parametrize(
    ("age", "sex", "clinical", "missing"),
    [
        ("061Y", "M", {"age": 61, "sex": "M"}, ()),
        ("006M", "F", {"age": 0.5, "sex": "F"}, ()),
        ("061Y", "O", {"age": 61}, ("sex",)),  # O: the model takes M or F only
        (None, None, {}, ("age", "sex")),
        ("61Y", "m", {}, ("age", "sex")),  # not DICOM AS / CS: never guessed
        ("150Y", "F", {"sex": "F"}, ("age",)),  # outside the server's 0..120
    ],
)
def test_age_and_sex_from_the_header(
    tmp_path: Path,
    age: str | None,
    sex: str | None,
    clinical: dict[str, Any],
    missing: tuple[str, ...],
) -> None:
    request = fibrosis(tmp_path, AGE_SEX, PatientAge=age, PatientSex=sex)
    assert (request.clinical, request.missing) == (clinical, missing)


def test_a_default_fills_in_for_the_header(tmp_path: Path) -> None:
    sources = {"age": {"from": "PatientAge", "default": 60}, "sex": {"default": "F"}}
    request = fibrosis(tmp_path, sources, PatientAge=None, PatientSex="M")
    assert (request.clinical, request.missing) == ({"age": 60, "sex": "F"}, ())
    request = fibrosis(tmp_path, sources, PatientAge="045Y")
    assert request.clinical == {"age": 45, "sex": "F"}  # the header first, then the default


@pytest.mark.parametrize(
    ("text", "years"),
    [
        ("061Y", 61),
        ("006M", 0.5),
        ("018M", 1.5),
        ("052W", 0.997),
        ("010D", 0.027),
        ("000D", 0),
        ("61Y", None),
        ("061y", None),
        ("0061Y", None),
        ("", None),
    ],
)
def test_patient_age_parses_dicom_age_strings(text: str, years: float | None) -> None:
    ds = Dataset()
    set_raw(ds, "PatientAge", text)
    assert patient_age(ds) == years


def test_field_strength_may_be_left_to_the_server(tmp_path: Path) -> None:
    series = headers("liver_fibrosis_mri", field_strength=3.0)
    hbv = {"hbv": {"default": "positive"}, "hcv": {"default": "negative"}}
    plain = rule(task="liver_fibrosis_mri", match={"Modality": "MR"}, clinical=hbv)
    request = route_one(ruleset(tmp_path, plain), series)
    assert (request.clinical, request.missing) == ({"hbv": "positive", "hcv": "negative"}, ())
    sources = {**hbv, "field_strength": {"from": "MagneticFieldStrength"}}
    read_it = rule(task="liver_fibrosis_mri", match={"Modality": "MR"}, clinical=sources)
    request = route_one(ruleset(tmp_path, read_it), series)
    assert request.clinical == {"field_strength": 3.0, "hbv": "positive", "hcv": "negative"}
    for ds in only(series):
        del ds.MagneticFieldStrength
    request = route_one(ruleset(tmp_path, read_it), series)
    assert request.missing == ("field_strength",)


def test_viral_status_without_a_default_is_missing(tmp_path: Path) -> None:
    bare = rule(task="liver_fibrosis_mri", match={"Modality": "MR"}, select={"method": "levels"})
    request = route_one(ruleset(tmp_path, bare), headers("liver_fibrosis_mri"))
    assert request.missing == ("hbv", "hcv")


def test_a_roi_default_is_sent_as_given(tmp_path: Path) -> None:
    clinical = {"roi": {"default": [226, 133, 271.5, 178]}}
    request = route_one(
        ruleset(tmp_path, phase_rule() | {"clinical": clinical}), headers("liver_mass_ct")
    )
    assert (request.clinical, request.missing) == ({"roi": [226, 133, 271.5, 178]}, ())


# --- no patient data in messages or logs -----------------------------------------------


def with_raw_value(data: bytes, keyword: str, value: bytes) -> bytes:
    """The file with one element's value bytes replaced (explicit VR little endian, same
    length): a malformed value as a scanner might write it, not as pydicom would."""
    tag = Tag(keyword)
    marker = struct.pack("<HH", tag.group, tag.element) + dictionary_VR(tag).encode()
    at = data.index(marker)
    (length,) = struct.unpack("<H", data[at + 6 : at + 8])
    padded = value.ljust(length)
    assert len(padded) == length
    return data[: at + 8] + padded + data[at + 8 + length :]


NAME, PATIENT_ID, BIRTH = b"ZYXWVUT^QWERTY", b"ID-98765432", b"19230405"


def test_no_patient_data_in_problems_or_logs(
    tmp_path: Path, example: RuleSet, caplog: pytest.LogCaptureFixture
) -> None:
    files = []
    replaced = {"PatientName": NAME, "PatientID": PATIENT_ID, "PatientBirthDate": BIRTH}
    replaced["PatientAge"] = b"0\xfe7Y"  # malformed: not read as an age
    for index, original in enumerate(phantom_files("liver_fibrosis_ct", 3)):
        data = original
        for keyword, value in replaced.items():
            data = with_raw_value(data, keyword, value)
        if index:  # malformed positions on all but one instance: too few images
            data = with_raw_value(data, "ImagePositionPatient", b"x\\y\\" + NAME)
        files.append(data)
    series = by_series(files)
    caplog.set_level(logging.DEBUG)
    levels = rule(task="liver_fibrosis_ct", clinical=AGE_SEX, select={"method": "levels"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        routings = [ruleset(tmp_path, levels).route_study(series), example.route_study(series)]
    request = routings[0].requests[0]
    assert request.problem == "needs 3 images, series has 1 (3 without a usable position)"
    assert (request.clinical, request.missing) == ({"sex": "M"}, ("age",))
    assert "needs 3 images" in caplog.text  # the log was written, without them
    seen = caplog.text + repr(routings) + "".join(str(item.message) for item in caught)
    for secret in (NAME, PATIENT_ID, BIRTH, b"0\xfe7Y"):
        assert secret.decode("latin-1") not in seen
    assert "ZYXWVUT" not in seen
    assert "98765432" not in seen


def test_a_malformed_attribute_fails_its_criterion_without_raising(tmp_path: Path) -> None:
    files = [
        with_raw_value(data, "SliceThickness", b"x.0") for data in phantom_files("bone_density_ct")
    ]
    series = by_series(files)
    thick = ruleset(tmp_path, rule(match={"SliceThickness": {"min": 1}}))
    assert thick.route_study(series).unmatched == tuple(series)
    plain = ruleset(tmp_path, rule(match={"Modality": "CT"}))
    assert len(route_one(plain, series).instances) == 9


# --- the rules file: every mistake refused at load ---------------------------------------

FILLER = rule("filler", task="liver_fibrosis_mri")


def bone(**fields: Any) -> dict[str, Any]:
    return rule("bone", **fields)


def fib(**fields: Any) -> dict[str, Any]:
    return rule("bone", task="liver_fibrosis_ct", **fields)


def mri(**fields: Any) -> dict[str, Any]:
    return rule("bone", task="liver_fibrosis_mri", match={"Modality": "MR"}, **fields)


def mass(**fields: Any) -> dict[str, Any]:
    return rule("bone", task="liver_mass_ct", scope="study", select=PHASES) | fields


TASK_LIST = (
    "liver_mass_ct, liver_fibrosis_ct, liver_fibrosis_mri, bone_density_ct, esophageal_cancer_ct"
)
ALLOWED_MATCH = "Modality, BodyPartExamined, SeriesDescription, ImageType, contrast, SliceThickness"
EVEN = {"method": "evenly_spaced"}

RULE_ERRORS: list[tuple[dict[str, Any], str]] = [
    # the rule
    (
        bone(slect={"method": "all"}),
        "the rule has unknown key 'slect'; allowed: name, task, scope, match, select, clinical",
    ),
    ({k: v for k, v in bone().items() if k != "match"}, "the rule needs 'match'"),
    ({k: v for k, v in bone().items() if k != "select"}, "the rule needs 'select'"),
    (bone(task="bone"), f"task must be one of {TASK_LIST}, got 'bone'"),
    (bone(scope="patient"), "scope must be series or study, got 'patient'"),
    (bone(scope="study"), "scope study goes with select.method phases, and only with it"),
    (mass(scope="series"), "scope study goes with select.method phases, and only with it"),
    # match
    (bone(match={"Modalty": "CT"}), f"match has unknown key 'Modalty'; allowed: {ALLOWED_MATCH}"),
    (bone(match={}), "match needs at least one criterion"),
    (bone(match=None), "match must be a mapping, got None"),
    (
        bone(match={"Modality": "ct"}),
        "match.Modality must be upper-case codes such as CT or MR, got 'ct'",
    ),
    (bone(match={"Modality": "MR"}), "match.Modality must be CT for bone_density_ct, got 'MR'"),
    (
        bone(match={"Modality": ["CT", "MR"]}),
        "match.Modality must be CT for bone_density_ct, got ['CT', 'MR']",
    ),
    (
        bone(match={"Modality": 5}),
        "match.Modality must be a modality code or a list of them, got 5",
    ),
    (
        bone(match={"SeriesDescription": []}),
        "match.SeriesDescription must be a pattern or a list of them, got []",
    ),
    (
        bone(match={"BodyPartExamined": ["abdomen", ""]}),
        "match.BodyPartExamined must be a pattern or a list of them, got ['abdomen', '']",
    ),
    (bone(match={"ImageType": ["PRIMARY"]}), "match.ImageType must be a mapping, got ['PRIMARY']"),
    (
        bone(match={"ImageType": {"include": ["PRIMARY"]}}),
        "match.ImageType has unknown key 'include'; allowed: includes, excludes",
    ),
    (bone(match={"ImageType": {}}), "match.ImageType needs includes, excludes or both"),
    (
        bone(match={"ImageType": {"excludes": 3}}),
        "match.ImageType.excludes must be a pattern or a list of them, got 3",
    ),
    (bone(match={"contrast": "yes"}), "match.contrast must be true or false, got 'yes'"),
    (bone(match={"SliceThickness": 5}), "match.SliceThickness must be a mapping, got 5"),
    (
        bone(match={"SliceThickness": {"mn": 1}}),
        "match.SliceThickness has unknown key 'mn'; allowed: min, max",
    ),
    (
        bone(match={"SliceThickness": {"max": "thin"}}),
        "match.SliceThickness.max must be a number, got 'thin'",
    ),
    (
        bone(match={"SliceThickness": {"min": 5, "max": 1}}),
        "match.SliceThickness min must not exceed max, got {'min': 5, 'max': 1}",
    ),
    (
        bone(match={"SliceThickness": {"min": -1}}),
        "match.SliceThickness bounds must not be negative (mm), got {'min': -1}",
    ),
    # select
    (bone(select={**EVEN, "count": "x"}), "select.count must be an integer 1..32, got 'x'"),
    (bone(select={**EVEN, "count": 0}), "select.count must be an integer 1..32, got 0"),
    (bone(select={**EVEN, "count": 33}), "select.count must be an integer 1..32, got 33"),
    (bone(select={**EVEN, "count": 9.0}), "select.count must be an integer 1..32, got 9.0"),
    (bone(select={**EVEN, "count": True}), "select.count must be an integer 1..32, got True"),
    (bone(select=EVEN), "select needs 'count' for method evenly_spaced"),
    (
        bone(select={"method": "every"}),
        "select.method must be one of all, evenly_spaced, levels, phases, got 'every'",
    ),
    (bone(select={}), "select.method must be one of all, evenly_spaced, levels, phases, got None"),
    (
        bone(select="all"),
        "select.method must be one of all, evenly_spaced, levels, phases, got 'all'",
    ),
    (
        bone(select={"method": "all", "count": 3}),
        "select has unknown key 'count'; allowed: method, z_range",
    ),
    (
        bone(select={**EVEN, "count": 9, "fractions": [0.5]}),
        "select has unknown key 'fractions'; allowed: method, count, z_range",
    ),
    (
        bone(select={"method": "all", "z_range": [1]}),
        "select.z_range must be [min_mm, max_mm], got [1]",
    ),
    (
        bone(select={"method": "all", "z_range": [10, -10]}),
        "select.z_range must have min_mm below max_mm, got [10, -10]",
    ),
    (
        bone(select={"method": "all", "z_range": ["a", 1]}),
        "select.z_range must be a number, got 'a'",
    ),
    (
        bone(select={"method": "levels", "fractions": [0.5, 0.25]}),
        "select.fractions must ascend (cranial to caudal), got [0.5, 0.25]",
    ),
    (
        bone(select={"method": "levels", "fractions": [0, 1.5]}),
        "select.fractions must lie within 0..1 (0 = the cranial end), got [0, 1.5]",
    ),
    (
        bone(select={"method": "levels", "fractions": "half"}),
        "select.fractions must be a list of numbers 0..1, got 'half'",
    ),
    (
        mri(select={"method": "levels", "fractions": [0.25, 0.75]}),
        "select.fractions must hold 3 levels for liver_fibrosis_mri, got [0.25, 0.75]",
    ),
    (mass(select={**PHASES, "count": 2}), "select.count must be 3, got 2"),
    (
        mass(select={**PHASES, "tolerance_mm": 0}),
        "select.tolerance_mm must be positive (mm), got 0",
    ),
    (mass(select={**PHASES, "z_mm": "mass"}), "select.z_mm must be a number, got 'mass'"),
    # clinical
    (fib(clinical=["age"]), "clinical must be a mapping, got ['age']"),
    (
        fib(clinical={"ages": {"from": "PatientAge"}}),
        "clinical has 'ages', not an input of liver_fibrosis_ct; its inputs: age, sex",
    ),
    (
        bone(clinical={"age": {"default": 60}}),
        "clinical has 'age', not an input of bone_density_ct; it has none",
    ),
    (
        fib(clinical={"age": {}}),
        "clinical.age needs 'from' (a header attribute), 'default' or both",
    ),
    (
        fib(clinical={"age": {"from": "PatientAge", "fallback": 60}}),
        "clinical.age has unknown key 'fallback'; allowed: from, default",
    ),
    (
        fib(clinical={"age": {"from": "PatientSex"}}),
        "clinical.age.from must be PatientAge, got 'PatientSex'",
    ),
    (
        mri(clinical={"hbv": {"from": "PatientSex"}}),
        "clinical.hbv.from is not possible: no header holds it; give a default",
    ),
    (fib(clinical={"sex": {"default": "X"}}), "clinical.sex.default must be one of M, F, got 'X'"),
    (
        fib(clinical={"age": {"default": 200}}),
        "clinical.age.default must lie within 0..120 years, got 200",
    ),
    (fib(clinical={"age": {"default": "60"}}), "clinical.age.default must be a number, got '60'"),
    (fib(clinical={"age": {"default": True}}), "clinical.age.default must be a number, got True"),
    (
        mri(clinical={"hbv": {"default": False}}),
        "clinical.hbv.default must be one of negative, positive, got False",
    ),
    (
        mri(clinical={"field_strength": {"default": 9}}),
        "clinical.field_strength.default must lie within 0.2..7 T, got 9",
    ),
    (
        mass(clinical={"roi": {"default": [1, 2, 3]}}),
        "clinical.roi.default must be four numbers [row_min, col_min, row_max, col_max], "
        "got [1, 2, 3]",
    ),
    (
        mass(clinical={"roi": {"default": [10, 10, 5, 20]}}),
        "clinical.roi.default must have 0 <= row_min < row_max and 0 <= col_min < col_max, "
        "got [10, 10, 5, 20]",
    ),
    (
        mass(clinical={"roi": {"from": "PatientAge"}}),
        "clinical.roi.from is not possible: no header holds it; give a default",
    ),
]


@pytest.mark.parametrize(
    ("entry", "message"), RULE_ERRORS, ids=[item[1][:50] for item in RULE_ERRORS]
)
def test_rule_errors_name_file_rule_and_field(tmp_path: Path, entry: Any, message: str) -> None:
    path = write_rules(tmp_path, FILLER, entry)
    with pytest.raises(RulesError) as raised:
        load_rules(path)
    assert str(raised.value) == f"{path}: rule 2 'bone': {message}"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({k: v for k, v in bone().items() if k != "name"}, "rule 2: name must be {}, got None"),
        (rule(""), "rule 2: name must be {}, got ''"),
        (rule("x" * 65), "rule 2: name must be {}, got '" + "x" * 56 + "..."),
        ("bone", "rule 2: the rule must be a mapping, got 'bone'"),
        (rule("filler"), "rule 2 'filler': name is already used by rule 1 'filler'"),
    ],
)
def test_rule_name_errors(tmp_path: Path, entry: Any, message: str) -> None:
    path = write_rules(tmp_path, FILLER, entry)
    with pytest.raises(RulesError) as raised:
        load_rules(path)
    name_rule = "1-64 letters, digits, spaces, '_', '.' or '-', starting with a letter or digit"
    assert str(raised.value) == f"{path}: {message.replace('{}', name_rule)}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty: it needs a 'rules' list"),
        ("{}", "the file needs 'rules'"),
        ("rule: []", "the file has unknown key 'rule'; allowed: rules"),
        ("rules: []", "rules must be a non-empty list, got []"),
        ("rules: {name: x}", "rules must be a non-empty list, got {'name': 'x'}"),
        ("- rules", "the file must be a mapping, got ['rules']"),
        (
            "rules: [\n",
            "not valid YAML at line 2, column 1: "
            "expected the node content, but found '<stream end>'",
        ),
        (
            "rules:\n  - name: a\n    task: bone_density_ct\n    match: {Modality: CT}\n"
            "    select: {method: all}\n    select: {method: evenly_spaced, count: 9}\n",
            "not valid YAML at line 6, column 5: repeated key 'select'",
        ),
    ],
)
def test_file_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(RulesError) as raised:
        load_rules(path)
    assert str(raised.value) == f"{path}: {message}"


def test_yaml_no_is_not_a_viral_status(tmp_path: Path) -> None:
    """YAML reads an unquoted no as false: refused, not sent as 'negative'."""
    path = tmp_path / "rules.yml"
    path.write_text(
        "rules:\n  - name: mri\n    task: liver_fibrosis_mri\n    match: {Modality: MR}\n"
        "    select: {method: levels}\n    clinical:\n      hbv: {default: no}\n"
    )
    with pytest.raises(RulesError) as raised:
        load_rules(path)
    assert str(raised.value) == (
        f"{path}: rule 1 'mri': clinical.hbv.default must be one of negative, positive, got False"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"rules": [], "rules": []}', "repeated key 'rules'"),
        ('{"rules": [', "not valid JSON at line 1, column 12: Expecting value"),
    ],
)
def test_json_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "rules.json"
    path.write_text(text)
    with pytest.raises(RulesError) as raised:
        load_rules(path)
    assert str(raised.value) == f"{path}: {message}"


def test_a_file_that_cannot_be_read(tmp_path: Path) -> None:
    for path, message in [
        (tmp_path / "rules.txt", "a rules file ends in .yaml, .yml or .json"),
        (tmp_path / "absent.yaml", "cannot read the rules file: No such file or directory"),
    ]:
        with pytest.raises(RulesError) as raised:
            load_rules(path)
        assert str(raised.value) == f"{path}: {message}"


def test_rules_error_is_a_value_error() -> None:
    assert issubclass(RulesError, ValueError)


def enhanced_series(task: str, **options: Any) -> Series:
    """The phantom study as one Enhanced (multi-frame) instance."""
    from abdoserve.export.phantom.enhanced import enhanced_multiframe

    data = enhanced_multiframe(build_study(task, seed=0, **options).instances)
    header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return {str(header.SeriesInstanceUID): [header]}


def test_an_enhanced_series_goes_whole_through_the_example(example: RuleSet) -> None:
    series = enhanced_series("bone_density_ct", slices=15)
    (header,) = next(iter(series.values()))
    request = route_one(example, series)  # matched on the shared groups' slice thickness
    assert (request.task, request.problem) == ("bone_density_ct", None)
    assert request.instances == (str(header.SOPInstanceUID),)


def test_an_enhanced_instance_with_more_frames_than_the_task_takes_is_a_problem(
    example: RuleSet,
) -> None:
    series = enhanced_series("bone_density_ct")
    (header,) = next(iter(series.values()))
    header.NumberOfFrames = 40
    request = route_one(example, series)
    assert request.instances == ()
    assert request.problem == (
        "series has 40 frames in 1 multi-frame instance(s), the task takes at most 32: "
        "frames of an enhanced instance are not selected"
    )
