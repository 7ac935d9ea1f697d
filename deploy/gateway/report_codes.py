"""The coded concepts of the gateway's Structured Reports.

Standard codes are used where DICOM PS3.16 (as pydicom ships it) has a fitting one:
the procedure (CID 100), finding sites, probability of cancer, yes/no (CID 230),
mean/maximum derivations (CID 7464) and UCUM units. The rest (the papers' own scores,
stages and categories, which no public terminology names) are private codes of the
`99ABDOSERVE` scheme, declared in the report's Coding Scheme Identification Sequence.
Code values are SH (at most 16 characters), code meanings LO (at most 64).
"""

from __future__ import annotations

from collections.abc import Mapping

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

SCHEME = "99ABDOSERVE"  # "99" prefix: a private coding scheme designator (PS3.16 8.2)
MAX_CODE_VALUE = 16
MAX_CODE_MEANING = 64


def private(value: str, meaning: str) -> Code:
    """A code of the AbdoServe private scheme."""
    if not value or len(value) > MAX_CODE_VALUE or len(meaning) > MAX_CODE_MEANING:
        raise ValueError(f"private code {value!r} {meaning!r} exceeds SH/LO lengths")
    return Code(value, SCHEME, meaning)


def coding_scheme() -> CodingSchemeIdentificationItem:
    """The declaration of the private scheme (no registry, no OID: both are then omitted)."""
    return CodingSchemeIdentificationItem(
        designator=SCHEME,
        name="AbdoServe private codes",
        version="1",
        responsible_organization="AbdoServe",
    )


REPORT_TITLE = codes.DCM.ImagingMeasurementReport  # CID 7021
# CID 100 has no abdomen- or liver-specific CT/MR entry; the LOINC "unspecified body
# region" procedures are in it, the finding sites say where.
PROCEDURES: Mapping[str, Code] = {
    "CT": codes.LN.CTUnspecifiedBodyRegion,
    "MR": codes.LN.MRIUnspecifiedBodyRegion,
}
FALLBACK_PROCEDURE = codes.SCT.ImagingProcedure

FINDING_SITES: Mapping[str, Code] = {
    "liver_mass_ct": codes.SCT.Liver,
    "liver_fibrosis_ct": codes.SCT.Liver,
    "liver_fibrosis_mri": codes.SCT.Liver,
    "bone_density_ct": codes.SCT.LumbarSpine,
    "esophageal_cancer_ct": codes.SCT.Esophagus,
}

# The numeric result of a regression or probability task, by its key in the answer.
SCORES: Mapping[str, Code] = {
    # The paper's reference is DXA; the value is a CT-based estimate of it, which no
    # LOINC DXA code describes (its method would be wrong): a private concept.
    "BMD": private("BMD-CT", "Estimated DXA lumbar spine bone mineral density"),
    "F_DLCT": private("F-DLCT", "Deep-learning liver fibrosis score on CT (F_DLCT)"),
    "F_DLMRI": private("F-DLMRI", "Deep-learning liver fibrosis score on MRI (F_DLMRI)"),
    "esophageal_cancer": codes.DCM.ProbabilityOfCancer,
}

# Units by the answer's unit string; probabilities carry "" and are dimensionless.
UNITS: Mapping[str, Code] = {
    "g/cm2": Code("g/cm2", "UCUM", "gram per square centimeter"),
    "stage": Code("{stage}", "UCUM", "stage"),  # a UCUM annotation: dimensionless
    "": codes.UCUM.NoUnits,
}
PROBABILITY_UNIT = codes.UCUM.NoUnits  # probabilities in [0, 1], as the answer gives them

FIBROSIS_STAGE = private("FIB-STAGE", "Liver fibrosis stage (F0-F4)")
STAGES: Mapping[str, Code] = {
    "F0": private("FIB-F0", "F0: no fibrosis"),
    "F1": private("FIB-F1", "F1: portal fibrosis"),
    "F2": private("FIB-F2", "F2: periportal fibrosis"),
    "F3": private("FIB-F3", "F3: septal fibrosis"),
    "F4": private("FIB-F4", "F4: cirrhosis"),
}

LIVER_MASS_CATEGORY = private("LMC", "Liver mass category (A-E)")
CATEGORIES: Mapping[str, Code] = {
    "A": private("LMC-A", "A: classic hepatocellular carcinoma"),
    "B": private("LMC-B", "B: malignant liver tumour other than classic HCC"),
    "C": private("LMC-C", "C: indeterminate, early HCC, dysplastic nodule or rare benign"),
    "D": private("LMC-D", "D: haemangioma"),
    "E": private("LMC-E", "E: cyst"),
}
CATEGORY_PROBABILITIES: Mapping[str, Code] = {
    label: private(f"P-LMC-{label}", f"Probability of liver mass category {label}")
    for label in CATEGORIES
}

# Yes/no flags by their key in the answer; the values are CID 230 "Yes-No".
FLAGS: Mapping[str, Code] = {
    "osteoporosis": private("OSTEOPOROSIS", "Osteoporosis by estimated BMD threshold"),
    "suspicious": private("EC-SUSPICIOUS", "Suspicious for oesophageal cancer"),
}
YES = codes.SCT.Yes
NO = codes.SCT.No

# How a study value comes from per-image values (CID 7464), by the spec's aggregation.
DERIVATIONS: Mapping[str, Code] = {"mean": codes.SCT.Mean, "max": codes.SCT.Maximum}

# The untrained-weights statement, a TEXT item whose value is the answer's notice.
NOTICE = private("NOT-CLINICAL", "Not for clinical use")


def fallback(key: str) -> Code:
    """A private code for a result key no table names (a task added after this module)."""
    return private(key[:MAX_CODE_VALUE], key[:MAX_CODE_MEANING])


def score_concept(key: str) -> Code:
    return SCORES.get(key) or fallback(key)


def unit_code(unit: str) -> Code:
    """The UCUM code of an answer's unit (an unknown one is taken as UCUM as it stands)."""
    return UNITS.get(unit) or Code(unit, "UCUM", unit)


def stage_code(stage: str) -> Code:
    return STAGES.get(stage) or fallback(stage)


def category_code(label: str, description: str) -> Code:
    known = CATEGORIES.get(label)
    if known is not None:
        return known
    return private(f"CAT-{label}"[:MAX_CODE_VALUE], f"{label}: {description}"[:MAX_CODE_MEANING])


def category_probability(label: str) -> Code:
    known = CATEGORY_PROBABILITIES.get(label)
    if known is not None:
        return known
    return private(f"P-{label}"[:MAX_CODE_VALUE], f"Probability of category {label}")


def flag_concept(name: str) -> Code:
    return FLAGS.get(name) or fallback(name)
