"""`labels.csv`: the labelled studies `abdoserve model validate` reads and `abdoserve
phantom cohort` writes. One row per study: `study` (its folder), the task's label column
below, then the task's clinical inputs where it has them."""

from __future__ import annotations

from collections.abc import Mapping

LABELS_FILE = "labels.csv"
LABEL_COLUMN: Mapping[str, str] = {
    "liver_mass_ct": "class",  # A-E
    "liver_fibrosis_ct": "stage",  # 0-4
    "liver_fibrosis_mri": "stage",
    "bone_density_ct": "bmd",  # g/cm2
    "esophageal_cancer_ct": "cancer",  # 0/1
}
