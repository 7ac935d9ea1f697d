"""`abdoserve infer --explain DIR` and the `<task>_explain` models against the real server.

For every task: the maps are for the version that answered, the PyTorch twin gives the
served output within 1e-4, each map is finite and not constant, the PNG and the DICOM
Secondary Capture show the slice with the legend burned in below it, and the untrained
weights are said to be NOT FOR CLINICAL USE in the description and in red in the band.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import highdicom
import numpy as np
import pydicom
import pytest
from PIL import Image

from abdoserve.deploy.cli import main as abdoserve_main
from abdoserve.export.explain.render import BAND_COLOUR, WARNING_COLOUR
from abdoserve.export.phantom import TASK_NAMES, build_study, write_study
from abdoserve_client.client import AbdoServeClient
from abdoserve_client.errors import InvalidRequestError

SEED = 3
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# key images per task for the phantom studies: top 3 slices, every slice, the 3 roles
EXPECTED_KEYS = {"esophageal_cancer_ct": 3, "liver_mass_ct": 3, "liver_fibrosis_mri": 3}


def explain_with_cli(task: str, tmp_path: Path, grpc_url: str, capsys: Any) -> tuple[Any, Path]:
    folder, maps = tmp_path / "study", tmp_path / "maps"
    write_study(build_study(task, seed=SEED), folder)
    argv = ["infer", task, str(folder), "--url", grpc_url, "--json", "--timeout", "120"]
    assert abdoserve_main([*argv, "--explain", str(maps)]) == 0
    return json.loads(capsys.readouterr().out), maps


@pytest.mark.parametrize("task", TASK_NAMES)
def test_infer_explain_writes_the_maps_of_the_version_that_answered(
    task: str, grpc_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    answered, maps = explain_with_cli(task, tmp_path, grpc_url, capsys)
    description = json.loads((maps / "explanation.json").read_text())
    study = build_study(task, seed=SEED)
    sources = {pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID: data for data in study.instances}
    keys = description["key_images"]
    assert len(keys) == EXPECTED_KEYS.get(task, len(study.instances))
    assert description["version"] == answered["answer"]["model"]["version"] == "1"
    assert description["notice"] == "NOT FOR CLINICAL USE"
    assert description["twin"]["max_abs_difference"] <= 1e-4
    image_values = np.asarray(answered["image_values"])
    for key in keys:
        served = image_values[key["sample"]]
        column = int(np.argmax(answered["study_values"])) if task == "liver_mass_ct" else 0
        assert abs(key["twin_value"] - served[column]) <= 1e-4
        assert abs(key["served_value"] - served[column]) <= 1e-6
        assert key["sop_instance_uid"] in sources
        check_map(key)
        check_png(maps / f"{key['n']}.png", key)
        check_capture(maps / f"{key['n']}.dcm", key, sources[key["sop_instance_uid"]])


def check_map(key: dict[str, Any]) -> None:
    saliency = key["saliency"]
    assert all(np.isfinite(value) for value in saliency.values())
    assert saliency["std"] > 1e-3 and saliency["max"] > saliency["min"]
    assert "NOT FOR CLINICAL USE: untrained weights" in key["legend"]
    assert any("not a localisation" in line for line in key["legend"])


def check_png(path: Path, key: dict[str, Any]) -> None:
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape == (key["rows"], key["columns"], 3)
    band = pixels[-key["legend_rows"] :].reshape(-1, 3)
    background = np.all(band == BAND_COLOUR, axis=1).mean()
    white = np.all(band >= 200, axis=1).sum()
    red = np.all(np.abs(band.astype(int) - WARNING_COLOUR) <= 40, axis=1).sum()
    assert background > 0.7 and white > 200 and red > 50
    image = pixels[: -key["legend_rows"]].astype(int)
    tinted = np.abs(image[..., 0] - image[..., 2]) > 30  # grey has R = B
    assert tinted.any(), "no saliency colour over the slice"


def check_capture(path: Path, key: dict[str, Any], source_bytes: bytes) -> None:
    capture = pydicom.dcmread(path)
    source = pydicom.dcmread(io.BytesIO(source_bytes), stop_before_pixels=True)
    assert capture.SOPClassUID == SECONDARY_CAPTURE
    assert capture.SOPInstanceUID == key["capture_sop_instance_uid"]
    assert capture.StudyInstanceUID == source.StudyInstanceUID
    assert capture.PatientID == source.PatientID
    assert capture.BurnedInAnnotation == "YES" and capture.PhotometricInterpretation == "RGB"
    assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    png = np.asarray(Image.open(path.with_suffix(".png")).convert("RGB"))
    np.testing.assert_array_equal(capture.pixel_array, png)
    read_back = highdicom.imread(path)  # highdicom reads it back, frame and all
    np.testing.assert_array_equal(read_back.get_frame(1), png)


def test_the_same_study_explained_twice_gives_the_same_objects(grpc_url: str) -> None:
    study = build_study("bone_density_ct", seed=SEED)
    with AbdoServeClient(grpc_url, timeout_s=120) as client:
        result = client.bone_density_ct(study.instances)
        first = client.explain("bone_density_ct", study.instances, result)
        second = client.explain("bone_density_ct", study.instances, result)
    assert first.pngs == second.pngs
    # the same objects to a PACS: same UIDs and pixels (only the content time differs)
    once, again = (
        [pydicom.dcmread(io.BytesIO(data)) for data in run.captures] for run in (first, second)
    )
    assert [item.SOPInstanceUID for item in once] == [item.SOPInstanceUID for item in again]
    assert [item.PixelData for item in once] == [item.PixelData for item in again]


def test_a_version_the_network_lacks_is_refused_by_name(grpc_url: str) -> None:
    study = build_study("bone_density_ct", seed=SEED)
    with AbdoServeClient(grpc_url, timeout_s=120) as client:
        result = client.bone_density_ct(study.instances)
        absent = dataclasses.replace(result, model=dataclasses.replace(result.model, version="7"))
        with pytest.raises(InvalidRequestError, match="bone_density_ct has no version 7"):
            client.explain("bone_density_ct", study.instances, absent)
