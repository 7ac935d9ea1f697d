"""The digital phantom: decoded with plain pydicom, its studies say what their truth says."""

from __future__ import annotations

import io
import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, CTImageStorage, MRImageStorage

from abdoserve.export.phantom import (
    TASK_NAMES,
    TRANSFER_SYNTAXES,
    PhantomStudy,
    build_study,
    write_study,
)
from abdoserve.preprocessing.tasks import TASKS

Array = npt.NDArray[np.float64]

SERIES_TASKS = (
    "liver_fibrosis_ct",
    "liver_fibrosis_mri",
    "bone_density_ct",
    "esophageal_cancer_ct",
)


@cache
def study(task: str, seed: int = 0, **options: Any) -> PhantomStudy:
    return build_study(task, seed=seed, **options)


def decode(data: bytes) -> tuple[Dataset, Array]:
    """The dataset and its values (HU for CT, stored units for MR), as a client decodes them."""
    ds = pydicom.dcmread(io.BytesIO(data))
    values = ds.pixel_array.astype(np.float64)
    if "RescaleSlope" in ds:
        values = values * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return ds, values


def patch(values: Array, region: dict[str, Any]) -> Array:
    r, c, h = region["row"], region["col"], region["patch_radius"]
    result: Array = values[r - h : r + h + 1, c - h : c + h + 1]
    return result


def regions_of(item: PhantomStudy, index: int) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = item.truth["instances"][index]["regions"]
    return found


@pytest.mark.parametrize("task", TASK_NAMES)
def test_named_regions_decode_to_the_truth_within_noise(task: str) -> None:
    item = study(task)
    noise = float(item.truth["noise_sd"])
    checked = 0
    for index, data in enumerate(item.instances):
        _, values = decode(data)
        for name, region in regions_of(item, index).items():
            if name == "air" and task == "liver_fibrosis_mri":
                continue  # magnitude MR noise floors at 0: background mean is biased up
            side = 2 * region["patch_radius"] + 1
            tolerance = max(5.0, 4 * noise / side)
            assert abs(patch(values, region).mean() - region["value"]) < tolerance, (index, name)
            checked += 1
    assert checked >= 5 * len(item.instances)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_without_noise_every_patch_pixel_equals_the_truth(task: str) -> None:
    noise_option = "noise_sd" if task == "liver_fibrosis_mri" else "noise_hu"
    item = study(task, **{noise_option: 0.0})
    for index, data in enumerate(item.instances):
        _, values = decode(data)
        for region in regions_of(item, index).values():
            np.testing.assert_array_equal(patch(values, region), region["value"])


@pytest.mark.parametrize("syntax", sorted(TRANSFER_SYNTAXES))
def test_every_transfer_syntax_round_trips_the_stored_values(syntax: str) -> None:
    for task, options in (("bone_density_ct", {"slices": 2}), ("liver_fibrosis_mri", {})):
        reference = study(task, **options)
        encoded = study(task, transfer_syntax=syntax, **options)
        for plain, data in zip(reference.instances, encoded.instances, strict=True):
            ds = pydicom.dcmread(io.BytesIO(data))
            assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[syntax]
            assert data[128:132] == b"DICM"
            expected = pydicom.dcmread(io.BytesIO(plain)).pixel_array
            np.testing.assert_array_equal(ds.pixel_array, expected)


@pytest.mark.parametrize(("signed", "bits_stored"), [(True, 16), (False, 12), (False, 16)])
def test_pixel_formats_store_the_same_hounsfield_units(signed: bool, bits_stored: int) -> None:
    reference = study("bone_density_ct", slices=2)
    other = study("bone_density_ct", slices=2, signed=signed, bits_stored=bits_stored)
    for plain, data in zip(reference.instances, other.instances, strict=True):
        ds, values = decode(data)
        assert ds.PixelRepresentation == int(signed)
        assert ds.BitsStored == bits_stored
        assert float(ds.RescaleIntercept) == (0.0 if signed else -1024.0)
        np.testing.assert_array_equal(values, decode(plain)[1])


def phase_values(item: PhantomStudy, name: str) -> dict[str, float]:
    """Mean value of a named region per phase."""
    found = {}
    for index, data in enumerate(item.instances):
        _, values = decode(data)
        phase = item.truth["instances"][index]["phase"]
        found[phase] = float(patch(values, regions_of(item, index)[name]).mean())
    return found


def test_cyst_stays_water_attenuation_in_every_phase() -> None:
    mass = phase_values(study("liver_mass_ct", mass_class="E"), "mass")
    assert all(0.0 <= value <= 20.0 for value in mass.values()), mass


def test_aorta_enhances_in_the_arterial_phase() -> None:
    aorta = phase_values(study("liver_mass_ct", mass_class="A"), "aorta")
    assert aorta["arterial"] > 200.0
    assert abs(aorta["non_contrast"] - 40.0) < 5.0


def test_classic_hcc_enhances_in_the_arterial_phase_and_washes_out() -> None:
    item = study("liver_mass_ct", mass_class="A")
    mass, liver = phase_values(item, "mass"), phase_values(item, "liver")
    assert mass["non_contrast"] < liver["non_contrast"]
    assert mass["arterial"] > liver["arterial"] + 20.0
    assert mass["delayed"] < liver["delayed"] - 10.0


def test_haemangioma_fills_in_to_the_blood_pool() -> None:
    item = study("liver_mass_ct", mass_class="D")
    mass, aorta = phase_values(item, "mass"), phase_values(item, "aorta")
    assert mass["arterial"] < 60.0  # centre not yet filled; only peripheral nodules enhance
    assert abs(mass["delayed"] - aorta["delayed"]) < 5.0


def test_mass_roi_boxes_the_mass_on_every_phase() -> None:
    item = study("liver_mass_ct", mass_class="B")
    roi: list[int] = item.clinical["roi"]  # type: ignore[assignment]
    row_min, col_min, row_max, col_max = roi
    box = item.truth["mass_bbox"]
    assert row_min < box[0] <= box[2] < row_max and col_min < box[1] <= box[3] < col_max
    for index in range(3):
        centre = regions_of(item, index)["mass"]
        assert row_min < centre["row"] < row_max and col_min < centre["col"] < col_max
    side_mm = (box[2] - box[0] + 1) * item.truth["pixel_spacing_mm"]
    assert abs(side_mm - 2 * item.truth["mass_radius_mm"]) < 2.0


@pytest.mark.parametrize("trabecular_hu", [70.0, 220.0])
def test_trabecular_bone_equals_the_parameter(trabecular_hu: float) -> None:
    item = study("bone_density_ct", trabecular_hu=trabecular_hu)
    means = []
    for index, data in enumerate(item.instances):
        region = regions_of(item, index)["trabecular_bone"]
        assert region["value"] == trabecular_hu
        means.append(patch(decode(data)[1], region).mean())
    assert len(means) == 9
    assert abs(float(np.mean(means)) - trabecular_hu) < 2.0
    assert item.truth["trabecular_hu"] == trabecular_hu


@pytest.mark.parametrize("task", TASK_NAMES)
def test_geometry_and_identity_are_consistent(task: str) -> None:
    item = study(task)
    truth = item.truth
    datasets = [decode(data)[0] for data in item.instances]
    spec = TASKS[task]
    assert spec.images.min_images <= len(datasets) <= spec.images.max_images
    for ds, record in zip(datasets, truth["instances"], strict=True):
        assert ds.SOPClassUID == (CTImageStorage if spec.modality == "CT" else MRImageStorage)
        assert ds.Modality == spec.modality
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(ds.ImagePositionPatient[2]) == pytest.approx(record["z_mm"])
        assert float(ds.SliceLocation) == pytest.approx(record["z_mm"])
        assert [float(v) for v in ds.PixelSpacing] == [truth["pixel_spacing_mm"]] * 2
        assert (ds.Rows, ds.Columns) == (truth["rows"], truth["columns"])
        assert ds.InstanceNumber == record["instance_number"]
        assert ds.SOPInstanceUID == record["sop_instance_uid"]
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert str(ds.PatientName) == "PHANTOM^ABDOMEN" and ds.PatientID == "PHANTOM-0000"
        assert UID(ds.StudyInstanceUID).is_valid and UID(ds.SOPInstanceUID).is_valid
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)


@pytest.mark.parametrize("task", SERIES_TASKS)
def test_series_come_unsorted_and_sort_by_position(task: str) -> None:
    item = study(task)
    datasets = [decode(data)[0] for data in item.instances]
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert z != sorted(z) and z != sorted(z, reverse=True)
    by_number = [z for _, z in sorted(zip([ds.InstanceNumber for ds in datasets], z, strict=True))]
    assert by_number == sorted(z, reverse=True)  # instance 1 is the most cranial
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1


def test_dynamic_phases_are_three_series_at_one_level_in_time_order() -> None:
    datasets = [decode(data)[0] for data in study("liver_mass_ct").instances]
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 3
    assert len({tuple(ds.ImagePositionPatient) for ds in datasets}) == 1
    times = [float(ds.AcquisitionTime) for ds in datasets]
    assert times == sorted(times) and len(set(times)) == 3
    assert "ContrastBolusAgent" not in datasets[0] and "ContrastBolusAgent" in datasets[1]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_clinical_inputs_are_what_the_task_accepts(task: str) -> None:
    item = study(task)
    clinical = json.loads(json.dumps(item.clinical))
    spec = TASKS[task]
    if task == "liver_mass_ct":
        assert set(clinical) == {"roi"} and len(clinical["roi"]) == 4
        return
    assert set(clinical) == {entry.name for entry in spec.clinical_inputs}
    for entry in spec.clinical_inputs:
        value = clinical[entry.name]
        if entry.kind == "number":
            assert entry.minimum <= value <= entry.maximum
        else:
            assert value in entry.choices


def test_clinical_inputs_agree_with_the_dicom_header() -> None:
    fibrosis_ct = study("liver_fibrosis_ct", age=67, sex="F")
    ds = decode(fibrosis_ct.instances[0])[0]
    assert fibrosis_ct.clinical == {"age": 67, "sex": "F"}
    assert (ds.PatientAge, ds.PatientSex) == ("067Y", "F")
    assert int(ds.StudyDate[:4]) - int(ds.PatientBirthDate[:4]) in (67, 68)
    mri = study("liver_fibrosis_mri", field_strength=3.0, hbv="positive", hcv="negative")
    assert mri.clinical == {"field_strength": 3.0, "hbv": "positive", "hcv": "negative"}
    for data in mri.instances:
        assert float(decode(data)[0].MagneticFieldStrength) == 3.0


def test_mri_levels_are_cranial_middle_caudal_and_liver_is_bright() -> None:
    item = study("liver_fibrosis_mri")
    levels = {r["level"]: r["z_mm"] for r in item.truth["instances"]}
    assert levels["cranial"] > levels["middle"] > levels["caudal"]
    for index, data in enumerate(item.instances):
        ds, values = decode(data)
        assert "RescaleSlope" not in ds and ds.PixelRepresentation == 0
        found = regions_of(item, index)
        liver = patch(values, found["liver"]).mean()
        assert liver > 1.5 * patch(values, found["aorta"]).mean()
        if "spleen" in found:
            assert liver > 1.5 * patch(values, found["spleen"]).mean()


def liver_pixels(item: PhantomStudy) -> Array:
    means = [patch(decode(d)[1], regions_of(item, 0)["liver"]) for d in item.instances[:1]]
    return np.concatenate([m.ravel() for m in means])


def test_fibrosis_darkens_and_roughens_the_hepatobiliary_liver() -> None:
    healthy = liver_pixels(study("liver_fibrosis_mri", noise_sd=0.0))
    fibrotic = liver_pixels(study("liver_fibrosis_mri", noise_sd=0.0, fibrosis=1.0))
    assert healthy.std() == 0.0
    assert fibrotic.mean() < healthy.mean() - 100.0
    fibrotic_ct = study("liver_fibrosis_ct", noise_hu=0.0, fibrosis=1.0)
    assert liver_pixels(fibrotic_ct).std() > 1.0


def test_oesophageal_wall_thickens_where_asked() -> None:
    item = study("esophageal_cancer_ct", thickened_slices=(2, 3))
    records = item.truth["instances"]
    for index, data in enumerate(item.instances):
        record = records[index]
        wall = regions_of(item, index)["oesophageal_wall"]
        thickened = record["instance_number"] - 1 in (2, 3)
        assert record["wall_thickened"] is thickened
        assert record["wall_thickness_mm"] == (15.0 if thickened else 4.0)
        if thickened:
            assert wall["patch_radius"] == 3
            assert 60.0 <= patch(decode(data)[1], wall).mean() <= 80.0
    assert item.truth["cancer"] is True
    normal = study("esophageal_cancer_ct", cancer=False)
    assert normal.truth["cancer"] is False
    assert not any(r["wall_thickened"] for r in normal.truth["instances"])


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    for task in TASK_NAMES:
        first, again = build_study(task, seed=5), build_study(task, seed=5)
        assert first.instances == again.instances and first.truth == again.truth
        assert build_study(task, seed=6).instances[0] != first.instances[0]


def test_write_study_writes_numbered_files_request_and_truth(tmp_path: Path) -> None:
    item = study("bone_density_ct")
    paths = write_study(item, tmp_path / "out")
    names = [path.name for path in paths]
    assert names == [f"{i:04d}.dcm" for i in range(1, 10)] + ["request.json", "truth.json"]
    assert json.loads((tmp_path / "out" / "request.json").read_text()) == item.clinical
    truth = json.loads((tmp_path / "out" / "truth.json").read_text())
    assert truth["instances"][0]["file"] == "0001.dcm"
    ds = pydicom.dcmread(tmp_path / "out" / "0001.dcm")
    assert ds.SOPInstanceUID == truth["instances"][0]["sop_instance_uid"]


@pytest.mark.parametrize(
    ("task", "options"),
    [
        ("no_such_task", {}),
        ("liver_mass_ct", {"mass_class": "F"}),
        ("bone_density_ct", {"slices": 0}),
        ("liver_fibrosis_ct", {"sex": "X"}),
        ("liver_fibrosis_mri", {"hbv": "maybe"}),
        ("esophageal_cancer_ct", {"thickened_slices": (99,)}),
        ("bone_density_ct", {"transfer_syntax": "JPEGBaseline8Bit"}),
        ("bone_density_ct", {"bits_stored": 8}),
    ],
)
def test_bad_options_are_refused(task: str, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        build_study(task, **options)
