"""Task specs: every task builds with full provenance; bad specs and overrides fail when built."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from abdoserve.preprocessing.specs import (
    ClinicalInput,
    CTWindow,
    FixedSpacing,
    ImageSet,
    IntakeLimits,
    MRPercentileScaling,
    Output,
    RoiCrop,
    Source,
    SpecError,
    TaskSpec,
    leaf_paths,
    provenance_of,
)
from abdoserve.preprocessing.study import StudyPreparer
from abdoserve.preprocessing.tasks import TASKS, get_task

EXPECTED_SHAPES = {
    "liver_mass_ct": ((3, 64, 64), 0),
    "liver_fibrosis_ct": ((1, 192, 192), 3),
    "liver_fibrosis_mri": ((3, 192, 192), 5),
    "bone_density_ct": ((1, 192, 192), 0),
    "esophageal_cancer_ct": ((1, 192, 192), 0),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SHAPES))
def test_every_task_builds_with_its_shapes(name: str) -> None:
    spec = get_task(name)
    assert spec is TASKS[name]
    shape, width = EXPECTED_SHAPES[name]
    assert spec.sample_shape == shape
    assert spec.feature_width == width
    assert StudyPreparer(spec).spec is spec


def test_the_five_seed_tasks_are_registered() -> None:
    assert sorted(TASKS) == sorted(EXPECTED_SHAPES)


@pytest.mark.parametrize("name", sorted(EXPECTED_SHAPES))
def test_every_leaf_has_paper_or_serving_choice_provenance(name: str) -> None:
    spec = TASKS[name]
    paths = list(leaf_paths(spec))
    assert len(paths) >= 20
    sources = {path: provenance_of(spec, path) for path in paths}
    assert all(found is not None for found in sources.values())
    kinds = {found.source for found in sources.values() if found is not None}
    assert kinds == {Source.PAPER, Source.CHOICE}
    assert all(found.note for found in sources.values() if found is not None)


def test_provenance_resolves_to_the_nearest_recorded_parent() -> None:
    spec = TASKS["liver_fibrosis_ct"]
    assert "clinical_inputs.age.offset" in set(leaf_paths(spec))
    offset = provenance_of(spec, "clinical_inputs.age.offset")
    choices = provenance_of(spec, "clinical_inputs.sex.choices")
    value_range = provenance_of(spec, "output.value_range")
    aggregation = provenance_of(spec, "output.aggregation")
    assert offset is not None and offset.source is Source.CHOICE
    assert choices is not None and choices.source is Source.PAPER
    assert value_range is not None and value_range.source is Source.PAPER
    assert aggregation is not None and aggregation.source is Source.CHOICE
    assert provenance_of(spec, "nothing.here") is None


def test_a_spec_without_provenance_for_some_leaves_fails_when_built() -> None:
    spec = TASKS["bone_density_ct"]
    sources = {key: value for key, value in spec.sources.items() if key != "limits"}
    with pytest.raises(SpecError, match=r"no provenance recorded for: limits\.max_bytes"):
        dataclasses.replace(spec, sources=sources)


INVALID_PARTS: list[tuple[Any, str]] = [
    (lambda: CTWindow(center_hu=40, width_hu=0), "width must be positive"),
    (lambda: CTWindow(center_hu=5000, width_hu=400), "center outside"),
    (lambda: MRPercentileScaling(99.0, 1.0), "lower < upper"),
    (lambda: FixedSpacing(spacing_mm=0.05, matrix=192), "spacing outside"),
    (lambda: FixedSpacing(spacing_mm=1.0, matrix=8), "matrix outside 16..1024"),
    (lambda: FixedSpacing(spacing_mm=1.0, matrix=192.0), "matrix must be an integer"),
    (lambda: RoiCrop(matrix=64, margin=0.5, min_fov_mm=30), "margin outside"),
    (lambda: RoiCrop(matrix=64, margin=1.5, min_fov_mm=0), "field of view must be positive"),
    (lambda: ImageSet((), 0, 4, "samples"), "1 <= min_images <= max_images"),
    (lambda: ImageSet(("a", "b"), 3, 3, "channels"), "exactly one image per role"),
    (lambda: ImageSet((), 1, 4, "channels"), "channel stacking needs named roles"),
    (lambda: ClinicalInput("Age", "number"), "bad input name 'Age'"),
    (lambda: ClinicalInput("age", "number", minimum=5, maximum=5), "minimum must be below"),
    (lambda: ClinicalInput("age", "number", scale=0), "scale must be positive"),
    (lambda: ClinicalInput("sex", "category", choices=("M",)), "two or more choices"),
    (lambda: ClinicalInput("sex", "category", choices=("M", "M")), "repeated choice"),
    (lambda: Output("regression", ("x", "y"), ("x",), "", "mean"), "one description per label"),
    (
        lambda: Output(
            "regression", ("s", "a", "b", "c"), ("", "", "", ""), "", "mean", (0, 1), (2, 1)
        ),
        "cutoffs must ascend",
    ),
    (
        lambda: Output("regression", ("s",), ("",), "", "mean", flag_below=1.0),
        "a flag needs a name",
    ),
    (lambda: Output("classification", ("a",), ("",), "", "none"), "two or more labels"),
    (lambda: IntakeLimits(max_bytes_per_instance=10), "below 1 KiB"),
    (lambda: IntakeLimits(max_instances_per_request=0), "below 1"),
    (
        lambda: IntakeLimits(max_inflated_bytes_per_request=128 * 1024 * 1024),
        "max_inflated_bytes_per_request below max_bytes_per_request",
    ),
    (
        lambda: IntakeLimits(max_pixel_bytes_per_request=16 * 1024 * 1024),
        "max_pixel_bytes_per_request below 2 x max_pixels_per_instance",
    ),
    (lambda: IntakeLimits(max_pixel_bytes_per_request=2.5e8), "must be an integer"),
]


@pytest.mark.parametrize(("build", "message"), INVALID_PARTS)
def test_invalid_parts_fail_when_built(build: Any, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        build()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"intensity": MRPercentileScaling()}, "a CT task needs a CT window"),
        ({"modality": "MR"}, "an MR task needs MR scaling"),
        ({"modality": "US"}, "unknown modality 'US'"),
        ({"name": "Bone Density"}, "bad task name"),
        ({"limits": IntakeLimits(max_instances_per_request=8)}, "exceeds limits.max_instances"),
        ({"geometry": 5}, "geometry must be FixedSpacing or RoiCrop"),
    ],
)
def test_invalid_task_specs_fail_when_built(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        dataclasses.replace(TASKS["bone_density_ct"], **changes)


def test_repeated_clinical_input_names_fail() -> None:
    spec = TASKS["liver_fibrosis_ct"]
    twice = (*spec.clinical_inputs, spec.clinical_inputs[0])
    with pytest.raises(SpecError, match="repeated clinical input name"):
        dataclasses.replace(spec, clinical_inputs=twice)


def test_an_override_is_recorded_and_changes_derived_values() -> None:
    base = TASKS["liver_fibrosis_ct"]
    spec = get_task(
        "liver_fibrosis_ct",
        {
            "geometry.matrix": 224,
            "intensity.center_hu": 40,
            "clinical_inputs.sex.choices": ["M", "F", "X"],
        },
    )
    assert spec.sample_shape == (1, 224, 224)
    assert spec.feature_width == 4
    assert spec.clinical_input("sex").choices == ("M", "F", "X")
    assert spec.intensity == CTWindow(center_hu=40.0, width_hu=250.0)
    assert isinstance(spec.intensity, CTWindow) and isinstance(spec.intensity.center_hu, float)
    for path, shown in (("geometry.matrix", "224"), ("intensity.center_hu", "40")):
        found = provenance_of(spec, path)
        assert found is not None and found.source is Source.OVERRIDE
        assert found.note == f"set to {shown}"
    untouched = provenance_of(spec, "geometry.spacing_mm")
    assert untouched is not None and untouched.source is Source.CHOICE
    # the registered spec is unchanged
    assert base.sample_shape == (1, 192, 192) and base.feature_width == 3
    assert provenance_of(base, "geometry.matrix") == provenance_of(base, "geometry")


def test_overriding_roles_and_stacking_changes_the_sample_shape() -> None:
    renamed = get_task("liver_mass_ct", {"images.roles": ["pre", "early", "late"]})
    assert renamed.images.roles == ("pre", "early", "late")
    assert renamed.sample_shape == (3, 64, 64)
    found = provenance_of(renamed, "images.roles")
    assert found is not None and found.source is Source.OVERRIDE
    assert get_task("liver_mass_ct", {"images.stacking": "samples"}).sample_shape == (1, 64, 64)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"geometry.matrixx": 224}, r"override 'geometry.matrixx': unknown field 'matrixx'"),
        ({"clinical_inputs.weight.minimum": 1}, r"no clinical input 'weight'"),
        ({"clinical_inputs.age.minimum": 200}, r"age: minimum must be below maximum"),
        ({"geometry.matrix": 8}, r"override 'geometry.matrix': matrix outside 16..1024"),
        ({"geometry.matrix": 224.0}, r"matrix must be an integer"),
        ({"geometry.matrix": "big"}, r"override 'geometry.matrix'"),
        ({"intensity.width_hu": -1}, r"width must be positive"),
        ({"images.max_images": 1000}, r"exceeds limits.max_instances_per_request"),
        ({"images.max_images": 4.5}, r"max_images must be an integer"),
        ({"geometry": {"matrix": 224}}, r"geometry must be FixedSpacing or RoiCrop"),
        ({"output.stage_cutoffs": [3.5, 0.5]}, r"cutoffs must ascend"),
    ],
)
def test_invalid_overrides_fail_when_built(overrides: dict[str, Any], message: str) -> None:
    path = next(iter(overrides))
    fibrosis = path.startswith(("clinical_inputs", "output.stage"))
    with pytest.raises(SpecError, match=message):
        get_task("liver_fibrosis_ct" if fibrosis else "bone_density_ct", overrides)


def test_unknown_task_is_a_spec_error_listing_the_known_ones() -> None:
    with pytest.raises(SpecError, match="unknown task 'kidney_ct'; known: liver_mass_ct"):
        get_task("kidney_ct")


def test_task_spec_type_is_frozen() -> None:
    spec = TASKS["bone_density_ct"]
    assert isinstance(spec, TaskSpec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.modality = "MR"  # type: ignore[misc]
