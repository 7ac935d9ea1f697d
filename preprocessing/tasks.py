"""The five seed tasks (Yasaka et al., 2018-2023).

Paper facts come from the abstracts; everything else is a serving choice, named
as such in `sources`, that a hospital can override for its own checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from abdoserve.preprocessing.specs import (
    Aggregation,
    ClinicalInput,
    CTWindow,
    FixedSpacing,
    ImageSet,
    MRPercentileScaling,
    Output,
    RoiCrop,
    SpecError,
    TaskSpec,
    choice,
    paper,
    with_overrides,
)
from abdoserve.preprocessing.tags import (
    MAGNETIC_FIELD_STRENGTH,
)

_LIMITS_CHOICE = choice("refuse oversized input before decoding pixel data")


def fibrosis_output(score: str, aggregation: Aggregation) -> Output:
    """A 0-4 fibrosis score with stages F0-F4 at the nearest integer (both fibrosis papers)."""
    return Output(
        kind="regression",
        labels=(score, "F0", "F1", "F2", "F3", "F4"),
        descriptions=(
            "deep-learning fibrosis score on the 0-4 stage scale",
            "no fibrosis",
            "portal fibrosis",
            "periportal fibrosis",
            "septal fibrosis",
            "cirrhosis",
        ),
        unit="stage",
        aggregation=aggregation,
        value_range=(0.0, 4.0),
        stage_cutoffs=(0.5, 1.5, 2.5, 3.5),
    )


LIVER_MASS_CT = TaskSpec(
    name="liver_mass_ct",
    title="Liver mass classification on dynamic CT",
    paper="Yasaka K et al. Radiology 2018;286:887-896",
    modality="CT",
    images=ImageSet(
        roles=("non_contrast", "arterial", "delayed"),
        min_images=3,
        max_images=3,
        stacking="channels",
    ),
    intensity=CTWindow(center_hu=100.0, width_hu=400.0),
    geometry=RoiCrop(matrix=64, margin=1.5, min_fov_mm=30.0),
    clinical_inputs=(),
    output=Output(
        kind="classification",
        labels=("A", "B", "C", "D", "E"),
        descriptions=(
            "classic hepatocellular carcinoma",
            "malignant liver tumour other than classic HCC",
            "indeterminate mass, early HCC, dysplastic nodule or rare benign mass",
            "haemangioma",
            "cyst",
        ),
        unit="",
        aggregation="none",
    ),
    sources={
        "modality": paper("dynamic CT"),
        "images.roles": paper("non-contrast, arterial and delayed phases of one mass"),
        "images": choice("one image per phase, at the level of the mass"),
        "images.stacking": choice("the three phases are the channels of one sample"),
        "intensity": choice("soft-tissue window 100/400 HU spans cyst to enhancing tumour"),
        "geometry": choice(
            "square crop around the request's ROI, 64 px: the paper's size is not in the abstract"
        ),
        "clinical_inputs": paper("images only"),
        "output.labels": paper("categories A-E"),
        "output.descriptions": paper("categories A-E"),
        "output": choice("softmax probabilities, study answer = the single mass"),
        "limits": _LIMITS_CHOICE,
    },
)

LIVER_FIBROSIS_CT = TaskSpec(
    name="liver_fibrosis_ct",
    title="Liver fibrosis staging on portal-venous CT",
    paper="Yasaka K et al. Eur Radiol 2018;28:4578-4585",
    modality="CT",
    images=ImageSet(roles=(), min_images=1, max_images=16, stacking="samples"),
    intensity=CTWindow(center_hu=60.0, width_hu=250.0),
    geometry=FixedSpacing(spacing_mm=1.5, matrix=192),
    clinical_inputs=(
        ClinicalInput("age", "number", unit="years", minimum=0, maximum=120, offset=60, scale=20),
        ClinicalInput("sex", "category", choices=("M", "F")),
    ),
    output=fibrosis_output("F_DLCT", "mean"),
    sources={
        "modality": paper("portal-venous-phase CT"),
        "images": choice("1-16 axial slices through the liver, each scored"),
        "intensity": choice("liver window 60/250 HU"),
        "geometry": choice(
            "1.5 mm pixels, 192 px (288 mm) centred: the liver magnification is not in the abstract"
        ),
        "clinical_inputs": paper("age and sex were inputs"),
        "clinical_inputs.age.offset": choice("feature scaling"),
        "clinical_inputs.age.scale": choice("feature scaling"),
        "clinical_inputs.age.minimum": choice("plausible range"),
        "clinical_inputs.age.maximum": choice("plausible range"),
        "output.labels": paper("F_DLCT on the F0-F4 scale"),
        "output.descriptions": paper("METAVIR-like stages F0-F4"),
        "output.value_range": paper("0-4 stage scale"),
        "output": choice("study score = mean of slice scores; stage = nearest integer"),
        "limits": _LIMITS_CHOICE,
    },
)

LIVER_FIBROSIS_MRI = TaskSpec(
    name="liver_fibrosis_mri",
    title="Liver fibrosis staging on gadoxetic-acid hepatobiliary-phase MRI",
    paper="Yasaka K et al. Radiology 2018;287:146-155",
    modality="MR",
    images=ImageSet(
        roles=("cranial", "middle", "caudal"), min_images=3, max_images=3, stacking="channels"
    ),
    intensity=MRPercentileScaling(lower_percentile=1.0, upper_percentile=99.0),
    geometry=FixedSpacing(spacing_mm=1.5, matrix=192),
    clinical_inputs=(
        ClinicalInput(
            "field_strength",
            "number",
            unit="T",
            minimum=0.2,
            maximum=7.0,
            offset=1.5,
            scale=1.5,
            dicom_fallback=MAGNETIC_FIELD_STRENGTH,
        ),
        ClinicalInput("hbv", "category", choices=("negative", "positive")),
        ClinicalInput("hcv", "category", choices=("negative", "positive")),
    ),
    output=fibrosis_output("F_DLMRI", "none"),
    sources={
        "modality": paper("gadoxetic-acid hepatobiliary phase MR"),
        "images.roles": paper("three section levels"),
        "images": choice("levels ordered cranial to caudal by position; stacked as channels"),
        "intensity": choice("per-image 1st-99th percentile scaling"),
        "geometry": choice("1.5 mm pixels, 192 px centred"),
        "clinical_inputs": paper("field strength and HBV/HCV status were inputs"),
        "clinical_inputs.field_strength.dicom_fallback": choice(
            "read (0018,0087) when the request leaves it out"
        ),
        "clinical_inputs.field_strength.offset": choice("feature scaling"),
        "clinical_inputs.field_strength.scale": choice("feature scaling"),
        "clinical_inputs.field_strength.minimum": choice("plausible range"),
        "clinical_inputs.field_strength.maximum": choice("plausible range"),
        "output.labels": paper("F_DLMRI on the F0-F4 scale"),
        "output.descriptions": paper("stages F0-F4"),
        "output.value_range": paper("0-4 stage scale"),
        "output": choice("one score per study; stage = nearest integer"),
        "limits": _LIMITS_CHOICE,
    },
)

BONE_DENSITY_CT = TaskSpec(
    name="bone_density_ct",
    title="Lumbar bone mineral density from unenhanced abdominal CT",
    paper="Yasaka K et al. Eur Radiol 2020;30:3549-3557",
    modality="CT",
    images=ImageSet(roles=(), min_images=1, max_images=32, stacking="samples"),
    intensity=CTWindow(center_hu=300.0, width_hu=1500.0),
    geometry=FixedSpacing(spacing_mm=1.0, matrix=192),
    clinical_inputs=(),
    output=Output(
        kind="regression",
        labels=("BMD",),
        descriptions=("estimated DXA lumbar bone mineral density",),
        unit="g/cm2",
        aggregation="mean",
        value_range=(0.2, 2.0),
        flag_name="osteoporosis",
        flag_below=0.70,
    ),
    sources={
        "modality": paper("unenhanced abdominal CT"),
        "images": paper("axial slices through the lumbar vertebrae (about 9 per patient)"),
        "images.max_images": choice("up to 32 slices"),
        "images.min_images": choice("one slice is enough to answer"),
        "images.stacking": choice("each slice scored"),
        "intensity": choice("bone window 300/1500 HU"),
        "geometry": choice("1 mm pixels, 192 px centred on the image (spine near midline)"),
        "clinical_inputs": paper("images only"),
        "output.labels": paper("DXA lumbar BMD"),
        "output.descriptions": paper("DXA lumbar BMD"),
        "output.unit": paper("g/cm2"),
        "output": choice(
            "study BMD = mean of slices; osteoporosis flag at <= 0.70 g/cm2, "
            "70% of a 1.0 g/cm2 young-adult mean (Japanese criterion)"
        ),
        "limits": _LIMITS_CHOICE,
    },
)

ESOPHAGEAL_CANCER_CT = TaskSpec(
    name="esophageal_cancer_ct",
    title="Oesophageal cancer detection on contrast-enhanced CT",
    paper="Yasaka K et al. Br J Radiol 2023 (bjr.20220685)",
    modality="CT",
    images=ImageSet(roles=(), min_images=1, max_images=128, stacking="samples"),
    intensity=CTWindow(center_hu=50.0, width_hu=350.0),
    geometry=FixedSpacing(spacing_mm=1.0, matrix=192),
    clinical_inputs=(),
    output=Output(
        kind="probability",
        labels=("esophageal_cancer",),
        descriptions=("probability of oesophageal cancer",),
        unit="",
        aggregation="max",
        flag_name="suspicious",
        flag_above=0.5,
    ),
    sources={
        "modality": paper("contrast-enhanced chest/abdominal CT"),
        "images": choice("up to 128 axial slices, each scored"),
        "intensity": choice("mediastinal window 50/350 HU"),
        "geometry": choice("1 mm pixels, 192 px centred (oesophagus near midline)"),
        "clinical_inputs": paper("images only"),
        "output.labels": paper("per-image and per-patient probability"),
        "output.descriptions": paper("per-image and per-patient probability"),
        "output": choice("per-patient probability = maximum over images; flag at 0.5"),
        "limits": _LIMITS_CHOICE,
    },
)

TASKS: Mapping[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        LIVER_MASS_CT,
        LIVER_FIBROSIS_CT,
        LIVER_FIBROSIS_MRI,
        BONE_DENSITY_CT,
        ESOPHAGEAL_CANCER_CT,
    )
}


def get_task(name: str, overrides: Mapping[str, Any] | None = None) -> TaskSpec:
    """The named task's spec, with a hospital's overrides applied and validated."""
    try:
        spec = TASKS[name]
    except KeyError as error:
        raise SpecError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from error
    return with_overrides(spec, overrides) if overrides else spec
