"""StudyPreparer: order by position and time (never by file order), phases kept apart."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from abdoserve.export.phantom import PhantomStudy, build_study
from abdoserve.preprocessing.arrangement import Image
from abdoserve.preprocessing.decode import decode_instance
from abdoserve.preprocessing.study import StudyPreparer
from abdoserve.preprocessing.tasks import TASKS, get_task


@pytest.fixture(scope="module")
def mass() -> PhantomStudy:
    return build_study("liver_mass_ct", seed=11, shuffle=True)


@pytest.fixture(scope="module")
def mri() -> PhantomStudy:
    return build_study("liver_fibrosis_mri", seed=11)


def truth_z(study: PhantomStudy) -> list[float]:
    return [float(item["z_mm"]) for item in study.truth["instances"]]


def single(preparer: StudyPreparer, data: bytes, index: int, roi: object = None) -> np.ndarray:
    """One instance prepared on its own, outside any study assembly."""
    decoded = decode_instance(data, index, preparer.spec.limits)
    return preparer.prepare_image(Image(decoded, 0, decoded.frames[0]), roi)


@pytest.mark.parametrize(
    ("task", "slices"),
    [("liver_fibrosis_ct", 6), ("bone_density_ct", 9), ("esophageal_cancer_ct", 8)],
)
def test_series_are_sorted_by_position_not_file_order(task: str, slices: int) -> None:
    study = build_study(task, seed=11, slices=slices)
    z = truth_z(study)
    assert z != sorted(z) and z != sorted(z, reverse=True)  # files come shuffled
    preparer = StudyPreparer(TASKS[task])
    prepared = preparer(study.instances, study.clinical)
    order = [int(index) for index in prepared.sources]
    assert order == [int(i) for i in np.argsort(z)]  # along the normal (0, 0, 1): caudal first
    assert prepared.samples.shape == (slices, 1, 192, 192)
    assert prepared.roles == () and prepared.role_sources == ()
    for sample, index in zip(prepared.samples, order, strict=True):
        np.testing.assert_array_equal(sample[0], single(preparer, study.instances[index], index))
    assert prepared.samples.min() >= 0.0 and prepared.samples.max() <= 1.0


def test_reversing_the_request_gives_the_same_samples() -> None:
    study = build_study("bone_density_ct", seed=12, slices=5)
    preparer = StudyPreparer(TASKS["bone_density_ct"])
    forward = preparer(study.instances, {})
    backward = preparer(study.instances[::-1], {})
    np.testing.assert_array_equal(forward.samples, backward.samples)
    np.testing.assert_array_equal(backward.sources, 4 - forward.sources)


def test_mri_levels_are_cranial_to_caudal(mri: PhantomStudy) -> None:
    levels = [item["level"] for item in mri.truth["instances"]]
    assert levels != ["cranial", "middle", "caudal"]  # shuffled in the request
    preparer = StudyPreparer(TASKS["liver_fibrosis_mri"])
    prepared = preparer(mri.instances, mri.clinical)
    assert prepared.roles == ("cranial", "middle", "caudal")
    assert [levels[index] for index in prepared.role_sources] == ["cranial", "middle", "caudal"]
    z = [truth_z(mri)[index] for index in prepared.role_sources]
    assert z[0] > z[1] > z[2]
    assert prepared.samples.shape == (1, 3, 192, 192)
    assert int(prepared.sources[0]) == prepared.role_sources[0]
    for channel, index in enumerate(prepared.role_sources):
        expected = single(preparer, mri.instances[index], index)
        np.testing.assert_array_equal(prepared.samples[0, channel], expected)
    expected_features = [
        (float(mri.clinical["field_strength"]) - 1.5) / 1.5,  # type: ignore[arg-type]
        *(
            1.0 if mri.clinical[name] == value else 0.0
            for name in ("hbv", "hcv")
            for value in ("negative", "positive")
        ),
    ]
    np.testing.assert_allclose(prepared.features, expected_features)


def test_liver_mass_phases_follow_acquisition_time_and_stay_apart(mass: PhantomStudy) -> None:
    phases = [item["phase"] for item in mass.truth["instances"]]
    assert phases != ["non_contrast", "arterial", "delayed"]  # shuffled in the request
    preparer = StudyPreparer(TASKS["liver_mass_ct"])
    prepared = preparer(mass.instances, mass.clinical)
    assert prepared.roles == ("non_contrast", "arterial", "delayed")
    assert [phases[index] for index in prepared.role_sources] == list(prepared.roles)
    assert prepared.samples.shape == (1, 3, 64, 64)
    roi = mass.clinical["roi"]
    for channel, index in enumerate(prepared.role_sources):
        expected = single(preparer, mass.instances[index], index, roi)
        np.testing.assert_array_equal(prepared.samples[0, channel], expected)
    # the phases differ: the aorta and the mass enhance after contrast
    assert float(np.abs(prepared.samples[0, 1] - prepared.samples[0, 0]).mean()) > 0.01


def test_phases_without_acquisition_times_keep_request_order(mass: PhantomStudy) -> None:
    def untimed(data: bytes) -> bytes:
        ds: Dataset = pydicom.dcmread(io.BytesIO(data))
        del ds.AcquisitionTime
        del ds.ContentTime
        out = io.BytesIO()
        ds.save_as(out)
        return out.getvalue()

    prepared = StudyPreparer(TASKS["liver_mass_ct"])(
        [untimed(d) for d in mass.instances], mass.clinical
    )
    assert prepared.role_sources == (0, 1, 2)


def test_a_grid_larger_than_the_image_is_filled_with_zero() -> None:
    study = build_study("bone_density_ct", seed=13, slices=1)
    spec = get_task("bone_density_ct", {"geometry.matrix": 512})  # 512 mm over a 384 mm image
    prepared = StudyPreparer(spec)(study.instances, {})
    image = prepared.samples[0, 0]
    assert image.shape == (512, 512)
    margin = (512 - 384) // 2
    assert np.all(image[: margin - 1] == 0.0) and np.all(image[:, -(margin - 1) :] == 0.0)
    assert image[256, 256] > 0.0


def test_a_study_prepares_the_same_twice() -> None:
    study = build_study("esophageal_cancer_ct", seed=14, slices=3)
    preparer = StudyPreparer(TASKS["esophageal_cancer_ct"])
    first = preparer(study.instances, {})
    second = preparer(study.instances, {})
    np.testing.assert_array_equal(first.samples, second.samples)
    assert first.samples.dtype == np.float32 and first.features.shape == (0,)
    assert first.sources.dtype == np.int32
