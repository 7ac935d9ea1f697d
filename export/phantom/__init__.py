"""A digital abdominal phantom that writes DICOM studies for every task.

Use `build_study(task, seed=..., transfer_syntax=..., **options)` for a
`PhantomStudy`, then `write_study(study, out_dir)` for its files.
"""

from abdoserve.export.phantom.common import PhantomStudy, write_study
from abdoserve.export.phantom.dicom_writer import TRANSFER_SYNTAXES
from abdoserve.export.phantom.liver import liver_fibrosis_ct, liver_fibrosis_mri, liver_mass_ct
from abdoserve.export.phantom.studies import (
    BUILDERS,
    bone_density_ct,
    build_study,
    esophageal_cancer_ct,
)

TASK_NAMES = tuple(BUILDERS)

__all__ = [
    "BUILDERS",
    "TASK_NAMES",
    "TRANSFER_SYNTAXES",
    "PhantomStudy",
    "bone_density_ct",
    "build_study",
    "esophageal_cancer_ct",
    "liver_fibrosis_ct",
    "liver_fibrosis_mri",
    "liver_mass_ct",
    "write_study",
]
