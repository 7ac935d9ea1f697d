"""Tissue labels and the value each takes per contrast phase.

CT numbers are conventional radiology values (textbook ranges, e.g. Brant &
Helms, Fundamentals of Diagnostic Radiology; LI-RADS CT/MRI v2018 for the
enhancement patterns): air -1000, fat -100 (-150..-50), muscle 40-60, unenhanced
liver 55-65 and 100-110 portal venous, unenhanced blood 35-45 and aorta 250-300
in the late arterial phase, cortical bone 700-1000, lumbar trabecular bone
50-250 (osteoporotic below about 80), simple cyst 0-20 in every phase.
Hepatobiliary-phase gadoxetic MR values are arbitrary stored units: the normal
liver takes the agent up and is the brightest soft tissue, spleen and vessels
are darker, fat is suppressed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

Phase = Literal["non_contrast", "arterial", "portal_venous", "delayed"]
PHASES: tuple[Phase, ...] = ("non_contrast", "arterial", "portal_venous", "delayed")
MassClass = Literal["A", "B", "C", "D", "E"]
MASS_CLASSES: tuple[MassClass, ...] = ("A", "B", "C", "D", "E")

FloatArray = npt.NDArray[np.float32]


class Label(enum.IntEnum):
    AIR = 0
    FAT = 1
    MUSCLE = 2
    LUNG = 3
    LIVER = 4
    SPLEEN = 5
    KIDNEY = 6
    AORTA = 7
    IVC = 8
    PORTAL_VEIN = 9
    HEART = 10
    CORTICAL_BONE = 11
    TRABECULAR_BONE = 12
    DISC = 13
    CSF = 14
    OESOPHAGUS_WALL = 15
    OESOPHAGEAL_TUMOUR = 16
    MASS_CORE = 17
    MASS_RIM = 18
    MASS_NODULE = 19


# HU in the order non-contrast, arterial, portal venous, delayed (3-5 min).
_CT_HU: dict[Label, tuple[float, float, float, float]] = {
    Label.AIR: (-1000, -1000, -1000, -1000),
    Label.FAT: (-100, -100, -100, -100),
    Label.MUSCLE: (50, 55, 60, 60),
    Label.LUNG: (-850, -850, -850, -850),
    Label.LIVER: (60, 75, 105, 90),
    Label.SPLEEN: (50, 120, 120, 100),
    Label.KIDNEY: (30, 180, 170, 140),
    Label.AORTA: (40, 280, 160, 120),
    Label.IVC: (40, 80, 150, 120),
    Label.PORTAL_VEIN: (40, 100, 180, 120),
    Label.HEART: (40, 250, 150, 120),
    Label.CORTICAL_BONE: (800, 800, 800, 800),
    Label.DISC: (80, 80, 85, 85),
    Label.CSF: (10, 10, 10, 10),
    Label.OESOPHAGUS_WALL: (40, 55, 60, 55),
    # Carcinoma thickens the wall to ~15 mm and enhances moderately (60-80 HU).
    Label.OESOPHAGEAL_TUMOUR: (40, 70, 75, 70),
}


@dataclass(frozen=True)
class MassPattern:
    """Enhancement of one mass class: HU per phase for core, rim and nodules.

    `rim_mm` is the rim's thickness (0: no rim); `nodules` paints peripheral
    nodules (haemangioma's discontinuous nodular enhancement).
    """

    core: tuple[float, float, float, float]
    rim: tuple[float, float, float, float]
    rim_mm: float
    nodules: bool


_BLOOD = _CT_HU[Label.AORTA]
MASS_PATTERNS: dict[MassClass, MassPattern] = {
    # Classic HCC: hypo unenhanced, arterial hyperenhancement, washout with an
    # enhancing capsule on the delayed phase (LI-RADS major features).
    "A": MassPattern((45, 115, 85, 65), (45, 115, 90, 105), rim_mm=1.5, nodules=False),
    # Metastasis / cholangiocarcinoma: arterial rim enhancement, progressive
    # (fibrous stroma) central enhancement on the delayed phase.
    "B": MassPattern((40, 50, 65, 80), (40, 100, 95, 85), rim_mm=4.0, nodules=False),
    # Indeterminate / early HCC / dysplastic nodule: near-isoattenuating throughout.
    "C": MassPattern((55, 70, 95, 80), (55, 70, 95, 80), rim_mm=0.0, nodules=False),
    # Haemangioma: follows the blood pool; peripheral nodules as bright as the
    # aorta in the arterial phase, centripetal fill-in complete when delayed.
    "D": MassPattern((40, 45, 130, _BLOOD[3]), _BLOOD, rim_mm=0.0, nodules=True),
    # Simple cyst: water attenuation, no enhancement.
    "E": MassPattern((10, 10, 10, 10), (10, 10, 10, 10), rim_mm=0.0, nodules=False),
}

# Hepatobiliary phase (20 min after gadoxetic acid), fat-suppressed T1 GRE.
_MR_UNITS: dict[Label, float] = {
    Label.AIR: 0,
    Label.FAT: 180,
    Label.MUSCLE: 380,
    Label.LUNG: 30,
    Label.LIVER: 1000,
    Label.SPLEEN: 520,
    Label.KIDNEY: 700,
    Label.AORTA: 300,
    Label.IVC: 300,
    Label.PORTAL_VEIN: 300,
    Label.HEART: 300,
    Label.CORTICAL_BONE: 60,
    Label.TRABECULAR_BONE: 350,
    Label.DISC: 420,
    Label.CSF: 150,
    Label.OESOPHAGUS_WALL: 420,
    Label.OESOPHAGEAL_TUMOUR: 480,
}

# Fibrosis lowers hepatocyte uptake of gadoxetic acid (lower liver signal).
MR_FIBROSIS_UPTAKE_LOSS = 0.3


def ct_values(phase: Phase, trabecular_hu: float, mass: MassClass = "E") -> FloatArray:
    """HU for every label (indexed by `Label`) in one phase."""
    index = PHASES.index(phase)
    values = np.zeros(len(Label), dtype=np.float32)
    for label, per_phase in _CT_HU.items():
        values[label] = per_phase[index]
    values[Label.TRABECULAR_BONE] = trabecular_hu
    pattern = MASS_PATTERNS[mass]
    values[Label.MASS_CORE] = pattern.core[index]
    values[Label.MASS_RIM] = pattern.rim[index]
    values[Label.MASS_NODULE] = pattern.rim[index]
    return values


def mr_values(fibrosis: float) -> FloatArray:
    """Hepatobiliary-phase MR units for every label; `fibrosis` in 0..1."""
    values = np.zeros(len(Label), dtype=np.float32)
    for label, units in _MR_UNITS.items():
        values[label] = units
    values[Label.LIVER] *= 1.0 - MR_FIBROSIS_UPTAKE_LOSS * fibrosis
    for label in (Label.MASS_CORE, Label.MASS_RIM, Label.MASS_NODULE):
        values[label] = 200  # a non-hepatocyte lesion is hypointense in this phase
    return values
