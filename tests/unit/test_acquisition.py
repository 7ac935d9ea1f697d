"""Where and when: one TM parser and one slice projection for the intake and the gateway.
TM in every form PS3.5 allows (and the ACR-NEMA one), invalid text refused by attribute
name without its value, DA + TM across midnight, and the same phantom studies ordered
the same by the intake (arrangement) and the gateway (selection)."""

from __future__ import annotations

import io
from collections import defaultdict

import pydicom
import pytest

from abdoserve.deploy.gateway.selection import phase_of, pick_phases, stack_of
from abdoserve.export.phantom.studies import build_study
from abdoserve.preprocessing.acquisition import (
    date_time_seconds,
    position_along,
    slice_normal,
    time_seconds,
    toward_head,
)
from abdoserve.preprocessing.arrangement import Image, order_levels, order_phases
from abdoserve.preprocessing.decode import decode_instance
from abdoserve.preprocessing.errors import AttributeProblem
from abdoserve.preprocessing.tags import ACQUISITION_TIME
from abdoserve.preprocessing.tasks import TASKS

ACQUISITION_DATE = 0x00080022
PHASES = ("non_contrast", "arterial", "delayed")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("12", 43200.0),
        ("1230", 45000.0),
        ("123045", 45045.0),
        ("123045.5", 45045.5),
        ("123045.000001", 45045.000001),
        ("235960", 86400.0),  # a leap second, as PS3.5 allows
        ("12:30:45", 45045.0),  # ACR-NEMA
        ("12:30:45.25", 45045.25),
        ("12:30", 45000.0),
        ("0700  ", 25200.0),  # padding
        ("070000\x00", 25200.0),
    ],
)
def test_time_forms(text: str, seconds: float) -> None:
    assert time_seconds(text, ACQUISITION_TIME) == pytest.approx(seconds, abs=1e-9)


def test_1230_is_after_120000() -> None:
    assert float("1230") < float("120000")  # why the text's float cannot order times
    assert time_seconds("1230", ACQUISITION_TIME) > time_seconds("120000", ACQUISITION_TIME)
    assert time_seconds("1230", ACQUISITION_TIME) - time_seconds("120000", ACQUISITION_TIME) == (
        30 * 60
    )


@pytest.mark.parametrize(
    "text",
    ["", "1", "123", "12345", "24", "1260", "126061", "12.5", "12:3", "1230451234567", "QUOKKA"],
)
def test_invalid_times_are_refused_by_name_never_echoed(text: str) -> None:
    with pytest.raises(AttributeProblem) as caught:
        time_seconds(text, ACQUISITION_TIME)
    assert str(caught.value) == (
        "(0008,0032) Acquisition Time is not a DICOM time (HH, HHMM, HHMMSS or HHMMSS.FFFFFF)"
    )


def test_date_and_time_order_across_midnight() -> None:
    before = date_time_seconds("20240131", ACQUISITION_DATE, "235950", ACQUISITION_TIME)
    after = date_time_seconds("20240201", ACQUISITION_DATE, "000030", ACQUISITION_TIME)
    assert after - before == pytest.approx(40.0)
    assert date_time_seconds("2024.02.01", ACQUISITION_DATE, "00:00:30", ACQUISITION_TIME) == (
        after
    )
    for bad in ("20241301", "20240230", "2024013", "QUOKKA"):
        with pytest.raises(AttributeProblem, match=r"^\(0008,0022\) Acquisition Date is not"):
            date_time_seconds(bad, ACQUISITION_DATE, "1200", ACQUISITION_TIME)
    with pytest.raises(AttributeProblem, match=r"^\(0008,0032\) Acquisition Time"):
        date_time_seconds("20240201", ACQUISITION_DATE, "2500", ACQUISITION_TIME)


def test_slice_position_along_the_normal() -> None:
    axial = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert slice_normal(axial) == (0.0, 0.0, 1.0)
    feet = slice_normal((1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    assert feet == (0.0, 0.0, -1.0) and toward_head(feet) == (-0.0, -0.0, 1.0)
    assert slice_normal((2.0, 0.0, 0.0, 0.0, 2.0, 0.0)) == (0.0, 0.0, 1.0)  # made unit
    assert position_along((10.0, -4.0, -120.5), toward_head(feet)) == -120.5


# --- the intake and the gateway order the same phantom studies the same ---------------


def rewritten(data: bytes, **attributes: object) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def sop_uid(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def intake_images(task: str, instances: list[bytes]) -> list[Image]:
    decoded = [decode_instance(data, i, TASKS[task].limits) for i, data in enumerate(instances)]
    return [Image(instance, 0, instance.frames[0]) for instance in decoded]


@pytest.mark.filterwarnings("ignore:Invalid value for VR TM")  # pydicom on ACR-NEMA TM
@pytest.mark.parametrize(
    "times",
    [
        ("1200", "120030", "1203"),  # as floats: 1200 < 1203 < 120030, the wrong order
        ("115930", "12:00:00", "120300.5"),  # the ACR-NEMA form beside the DICOM ones
        ("23", "2301", "230130"),
    ],
)
def test_intake_and_gateway_order_phases_alike(times: tuple[str, str, str]) -> None:
    study = build_study("liver_mass_ct", seed=11, shuffle=True)
    phases = [item["phase"] for item in study.truth["instances"]]
    assert phases != list(PHASES)  # shuffled in the request
    instances = [
        rewritten(data, AcquisitionTime=times[PHASES.index(phase)], ContentTime="000000")
        for data, phase in zip(study.instances, phases, strict=True)
    ]
    expected = [sop_uid(instances[phases.index(phase)]) for phase in PHASES]
    intake = [
        sop_uid(instances[image.index])
        for image in order_phases(intake_images("liver_mass_ct", instances))
    ]
    series: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for data in instances:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        series[str(ds.SeriesInstanceUID)].append(ds)
    _, picked = pick_phases([phase_of(uid, found) for uid, found in series.items()], 3, None, 5)
    assert picked.problem is None
    assert intake == list(picked.instances) == expected


@pytest.mark.parametrize("feet_first", [False, True])
def test_intake_and_gateway_order_section_levels_alike(feet_first: bool) -> None:
    study = build_study("liver_fibrosis_mri", seed=11)
    instances = list(study.instances)
    if feet_first:  # the column direction reversed: the normal points to the feet
        instances = [
            rewritten(data, ImageOrientationPatient=[1, 0, 0, 0, -1, 0]) for data in instances
        ]
    truth = [float(item["z_mm"]) for item in study.truth["instances"]]
    expected = [sop_uid(instances[i]) for i in sorted(range(len(truth)), key=lambda i: -truth[i])]
    images = intake_images("liver_fibrosis_mri", instances)
    intake = [sop_uid(instances[image.index]) for image in order_levels(images)]
    headers = [pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True) for data in instances]
    gateway = [item.sop_uid for item in stack_of(headers).slices]
    assert intake == gateway == expected
