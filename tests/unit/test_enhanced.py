"""Enhanced CT and MR multi-frame objects: geometry and modality LUT from the functional
groups, frame by frame where they differ, giving the same tensors as the single-frame study."""

from __future__ import annotations

from collections.abc import Mapping
from io import BytesIO
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from abdoserve.export.phantom import build_study
from abdoserve.export.phantom.enhanced import PER_FRAME_SHIFT, enhanced_multiframe
from abdoserve.preprocessing.decode import decode_instance
from abdoserve.preprocessing.errors import AttributeProblem, ModalityLutError
from abdoserve.preprocessing.specs import IntakeLimits
from abdoserve.preprocessing.study import StudyPreparer
from abdoserve.preprocessing.tasks import get_task


def prepared_samples(
    task: str, instances: tuple[bytes, ...], clinical: Mapping[str, Any]
) -> np.ndarray:
    return StudyPreparer(get_task(task))(instances, clinical).samples


@pytest.mark.parametrize("per_frame_lut", [False, True])
@pytest.mark.parametrize("task", ["bone_density_ct", "liver_fibrosis_ct", "liver_fibrosis_mri"])
def test_an_enhanced_object_gives_the_tensors_of_its_single_frame_study(
    task: str, per_frame_lut: bool
) -> None:
    study = build_study(task, seed=2)
    enhanced = enhanced_multiframe(study.instances, per_frame_lut=per_frame_lut)
    single = prepared_samples(task, study.instances, study.clinical)
    multi = prepared_samples(task, (enhanced,), study.clinical)
    assert multi.shape == single.shape
    np.testing.assert_allclose(multi, single, rtol=0, atol=1e-6)


def test_a_per_frame_lut_is_read_frame_by_frame() -> None:
    study = build_study("bone_density_ct", seed=2)
    enhanced = enhanced_multiframe(study.instances, per_frame_lut=True)
    decoded = decode_instance(enhanced, 0, IntakeLimits())
    intercepts = [frame.intercept for frame in decoded.frames]
    first = intercepts[0]
    assert intercepts == [first - PER_FRAME_SHIFT * number for number in range(len(intercepts))]
    assert len(set(intercepts)) == len(study.instances) > 1


def _rewrite(data: bytes, change: Any) -> bytes:
    dataset = dcmread(BytesIO(data))
    change(dataset)
    out = BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_an_enhanced_ct_without_any_rescale_names_the_missing_attribute() -> None:
    study = build_study("bone_density_ct", seed=2)

    def drop_lut(dataset: Dataset) -> None:
        del dataset.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence

    broken = _rewrite(enhanced_multiframe(study.instances), drop_lut)
    with pytest.raises(AttributeProblem, match=r"^instance 0: \(0028,1053\) Rescale Slope is"):
        decode_instance(broken, 0, IntakeLimits())


def test_a_modality_lut_sequence_is_refused_with_its_own_reason() -> None:
    study = build_study("bone_density_ct", seed=2)

    def add_lut_sequence(dataset: Dataset) -> None:
        lut = Dataset()
        lut.LUTDescriptor = [4096, 0, 16]
        lut.ModalityLUTType = "HU"
        lut.add_new("LUTData", "OW", np.arange(4096, dtype="<u2").tobytes())
        dataset.ModalityLUTSequence = [lut]

    with_lut = _rewrite(study.instances[0], add_lut_sequence)
    with pytest.raises(ModalityLutError, match=r"\(0028,3000\) Modality LUT Sequence") as caught:
        decode_instance(with_lut, 0, IntakeLimits())
    assert caught.value.reason == "modality_lut"
