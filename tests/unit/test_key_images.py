"""Which images carry an answer, per task, on hand-made answers (no network run)."""

from __future__ import annotations

import numpy as np
import pytest

from abdoserve.export.explain.key_images import KeyImage, choose_key_images, explained_output
from abdoserve.preprocessing.tasks import get_task


def test_oesophageal_keys_are_the_top_three_slices_by_probability() -> None:
    spec = get_task("esophageal_cancer_ct")
    per_image = np.array([[0.10], [0.92], [0.40], [0.05], [0.77], [0.40]], dtype=np.float32)
    sources = [5, 4, 3, 2, 1, 0]  # request instances in the network's (position) order
    keys = choose_key_images(spec, per_image, sources, {})
    assert [(key.sample, key.instance) for key in keys] == [(1, 4), (4, 1), (2, 3)]
    assert keys[0].why == "top 1 of 3 by per-image probability"


def test_oesophageal_keys_of_a_short_series_are_every_slice_ranked() -> None:
    spec = get_task("esophageal_cancer_ct")
    keys = choose_key_images(spec, np.array([[0.2], [0.6]], np.float32), [0, 1], {})
    assert [key.sample for key in keys] == [1, 0]


@pytest.mark.parametrize("task", ["bone_density_ct", "liver_fibrosis_ct"])
def test_mean_tasks_keep_every_slice_used_in_order(task: str) -> None:
    spec = get_task(task)
    per_image = np.array([[0.8], [1.1], [0.9], [1.0]], dtype=np.float32)
    keys = choose_key_images(spec, per_image, [2, 0, 3, 1], {})
    assert keys == [
        KeyImage(0, 2, "slice used"),
        KeyImage(1, 0, "slice used"),
        KeyImage(2, 3, "slice used"),
        KeyImage(3, 1, "slice used"),
    ]


def test_liver_mass_keys_are_its_three_phases() -> None:
    spec = get_task("liver_mass_ct")
    answer = np.array([[0.1, 0.2, 0.5, 0.1, 0.1]], dtype=np.float32)
    roles = {"delayed": 0, "arterial": 2, "non_contrast": 1}
    keys = choose_key_images(spec, answer, [1], roles)
    assert [(key.why, key.instance, key.sample) for key in keys] == [
        ("non_contrast", 1, 0),
        ("arterial", 2, 0),
        ("delayed", 0, 0),
    ]
    assert explained_output(spec, answer[0]) == 2  # the answered class, C


def test_fibrosis_mri_keys_are_its_three_levels() -> None:
    spec = get_task("liver_fibrosis_mri")
    roles = dict(zip(spec.images.roles, [2, 0, 1], strict=True))
    keys = choose_key_images(spec, np.array([[2.4]], np.float32), [2], roles)
    assert [key.instance for key in keys] == [2, 0, 1]
    assert [key.why for key in keys] == list(spec.images.roles)
    assert explained_output(spec, np.array([2.4])) == 0


def test_a_mismatched_answer_is_refused() -> None:
    with pytest.raises(ValueError, match="3 sample values for 2 sources"):
        choose_key_images(get_task("bone_density_ct"), np.ones((3, 1)), [0, 1], {})
