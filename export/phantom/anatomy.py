"""Where the organs lie: a label map of one axial slice at a z position.

Patient coordinates follow DICOM (LPS): x grows to the patient's left, y to
the posterior, z to the head. The slice grid is centred on x = y = 0, so image
columns run right-to-left of the patient and rows anterior-to-posterior, as a
radiologist views an axial CT. Sizes are those of an average adult abdomen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from abdoserve.export.phantom.tissues import MASS_PATTERNS, Label, MassClass

LabelMap = npt.NDArray[np.uint8]
BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float32]

# Craniocaudal extents (mm, z grows cranially); L1's centre sits at z = -40.
LIVER_Z = (-130.0, 40.0)
SPLEEN_Z = (-60.0, 30.0)
KIDNEY_Z = (-135.0, -20.0)
HEART_Z = (45.0, 160.0)
LUNG_BASE_Z = 25.0
GE_JUNCTION_Z = -15.0
L1_CENTRE_Z = -40.0
VERTEBRA_PITCH_MM = 36.0  # one body (27 mm) plus one disc (9 mm)
VERTEBRA_HALF_HEIGHT_MM = 13.5
AORTA_XY = (22.0, 42.0)
VERTEBRA_XY = (0.0, 70.0)
OESOPHAGUS_LUMEN_MM = 3.0
NORMAL_OESOPHAGEAL_WALL_MM = 4.0  # normal wall is under 5 mm


@dataclass(frozen=True)
class PhantomGrid:
    """A square pixel grid centred on the body axis."""

    rows: int
    cols: int
    spacing_mm: float

    def xs(self) -> FloatArray:
        return ((np.arange(self.cols) - (self.cols - 1) / 2) * self.spacing_mm).astype(np.float32)

    def ys(self) -> FloatArray:
        return ((np.arange(self.rows) - (self.rows - 1) / 2) * self.spacing_mm).astype(np.float32)

    @property
    def origin_mm(self) -> tuple[float, float]:
        """(x, y) of the centre of the first pixel: Image Position (Patient)."""
        return (-(self.cols - 1) / 2 * self.spacing_mm, -(self.rows - 1) / 2 * self.spacing_mm)

    def pixel(self, x_mm: float, y_mm: float) -> tuple[int, int]:
        x0, y0 = self.origin_mm
        return round((y_mm - y0) / self.spacing_mm), round((x_mm - x0) / self.spacing_mm)


@dataclass(frozen=True)
class Ellipse:
    cx: float
    cy: float
    a: float
    b: float

    def scaled(self, factor: float) -> Ellipse:
        return Ellipse(self.cx, self.cy, self.a * factor, self.b * factor)


@dataclass(frozen=True)
class Mass:
    """A spherical liver mass of one class, centred at (x, y, z) mm."""

    mass_class: MassClass
    x_mm: float
    y_mm: float
    z_mm: float
    radius_mm: float


@dataclass(frozen=True)
class SliceAnatomy:
    """What varies between phantoms at one slice, beyond z."""

    z_mm: float
    mass: Mass | None = None
    oesophageal_wall_mm: float = NORMAL_OESOPHAGEAL_WALL_MM
    liver_surface: FloatArray | None = None  # per-pixel boundary offset: fibrotic nodularity


def _window(grid: PhantomGrid, shape: Ellipse) -> tuple[slice, slice, BoolArray] | None:
    """The shape's bounding box on the grid and its mask there (None if off-grid)."""
    if shape.a <= 0 or shape.b <= 0:
        return None
    x0, y0 = grid.origin_mm
    c0 = max(math.floor((shape.cx - shape.a - x0) / grid.spacing_mm), 0)
    c1 = min(math.ceil((shape.cx + shape.a - x0) / grid.spacing_mm) + 1, grid.cols)
    r0 = max(math.floor((shape.cy - shape.b - y0) / grid.spacing_mm), 0)
    r1 = min(math.ceil((shape.cy + shape.b - y0) / grid.spacing_mm) + 1, grid.rows)
    if c0 >= c1 or r0 >= r1:
        return None
    dx = ((grid.xs()[c0:c1] - shape.cx) / shape.a) ** 2
    dy = ((grid.ys()[r0:r1] - shape.cy) / shape.b) ** 2
    return slice(r0, r1), slice(c0, c1), (dy[:, None] + dx[None, :]) <= 1.0


def paint(
    labels: LabelMap,
    grid: PhantomGrid,
    shape: Ellipse,
    label: Label,
    within: BoolArray | None = None,
) -> None:
    """Set `label` inside the ellipse (and inside `within`, when given)."""
    found = _window(grid, shape)
    if found is None:
        return
    rows, cols, mask = found
    if within is not None:
        mask &= within[rows, cols]
    labels[rows, cols][mask] = label


def ellipse_mask(grid: PhantomGrid, shape: Ellipse) -> BoolArray:
    mask = np.zeros((grid.rows, grid.cols), dtype=bool)
    found = _window(grid, shape)
    if found is not None:
        rows, cols, inside = found
        mask[rows, cols] = inside
    return mask


def extent(z_mm: float, z_range: tuple[float, float], floor: float = 0.35) -> float:
    """Cross-section scale of an organ at z: 0 outside its range, rounded at its poles."""
    low, high = z_range
    if not low <= z_mm <= high:
        return 0.0
    half = (high - low) / 2
    t = (z_mm - (low + high) / 2) / half
    return floor + (1 - floor) * math.sqrt(max(1.0 - t * t, 0.0))


def label_slice(grid: PhantomGrid, anatomy: SliceAnatomy) -> LabelMap:
    """The tissue label of every pixel of one axial slice."""
    labels = np.zeros((grid.rows, grid.cols), dtype=np.uint8)
    z = anatomy.z_mm
    interior = _paint_body(labels, grid)
    _paint_chest(labels, grid, z, interior)
    _paint_liver(labels, grid, z, interior, anatomy.liver_surface)
    _paint_abdomen(labels, grid, z, interior)
    _paint_oesophagus(labels, grid, z, anatomy.oesophageal_wall_mm)
    paint(labels, grid, Ellipse(*AORTA_XY, 12.0, 12.0), Label.AORTA)
    _paint_spine(labels, grid, z)
    if z > -100:
        _paint_ribs(labels, grid)
    if anatomy.mass is not None:
        _paint_mass(labels, grid, z, anatomy.mass)
    return labels


def _paint_body(labels: LabelMap, grid: PhantomGrid) -> BoolArray:
    """Subcutaneous fat, the muscular body wall; returns the cavity inside it."""
    paint(labels, grid, Ellipse(0, 10, 165, 125), Label.FAT)
    paint(labels, grid, Ellipse(0, 10, 148, 110), Label.MUSCLE)
    cavity = Ellipse(0, 10, 138, 100)
    paint(labels, grid, cavity, Label.FAT)  # visceral fat fills what organs leave
    return ellipse_mask(grid, cavity)


def _paint_chest(labels: LabelMap, grid: PhantomGrid, z: float, interior: BoolArray) -> None:
    if z > LUNG_BASE_Z:
        grow = 0.4 + 0.6 * min(1.0, (z - LUNG_BASE_Z) / 50)
        for side in (-1, 1):
            paint(labels, grid, Ellipse(side * 75, 20, 55, 85).scaled(grow), Label.LUNG, interior)
    heart = extent(z, HEART_Z)
    paint(labels, grid, Ellipse(15, -45, 60, 48).scaled(heart), Label.HEART, interior)


def _quadric(grid: PhantomGrid, shape: Ellipse) -> FloatArray:
    """((x - cx) / a)^2 + ((y - cy) / b)^2 over the whole grid: <= 1 inside."""
    dx = ((grid.xs() - shape.cx) / shape.a) ** 2
    dy = ((grid.ys() - shape.cy) / shape.b) ** 2
    return dy[:, None] + dx[None, :]


def _paint_liver(
    labels: LabelMap, grid: PhantomGrid, z: float, interior: BoolArray, surface: FloatArray | None
) -> None:
    size = extent(z, LIVER_Z)
    if size == 0:
        return
    right, left = Ellipse(-60, -10, 75, 80), Ellipse(10, -45, 45, 30)
    level = np.minimum(_quadric(grid, right.scaled(size)), _quadric(grid, left.scaled(size)))
    if surface is not None:
        level -= surface  # a bumpy boundary: the nodular surface of cirrhosis
    labels[(level <= 1.0) & interior] = Label.LIVER
    if -45 <= z <= -5:
        paint(labels, grid, Ellipse(-30, 5, 7, 7), Label.PORTAL_VEIN)
    paint(labels, grid, Ellipse(-22, 40, 12, 10), Label.IVC)


def _paint_abdomen(labels: LabelMap, grid: PhantomGrid, z: float, interior: BoolArray) -> None:
    kidney = extent(z, KIDNEY_Z)
    for side in (-1, 1):
        paint(labels, grid, Ellipse(side * 65, 75, 25, 30).scaled(kidney), Label.KIDNEY, interior)
    spleen = extent(z, SPLEEN_Z)
    paint(labels, grid, Ellipse(100, 20, 25, 50).scaled(spleen), Label.SPLEEN, interior)
    if z < -50:
        psoas = min(1.0, (-50 - z) / 80) * 18
        for side in (-1, 1):
            paint(labels, grid, Ellipse(side * 38, 72, psoas, psoas), Label.MUSCLE)


def oesophagus_centre(z: float) -> tuple[float, float] | None:
    """Midline in the posterior mediastinum, curving left to the GE junction."""
    if z < GE_JUNCTION_Z:
        return None
    shift = min(max((30.0 - z) / 45.0, 0.0), 1.0)
    return 30.0 * shift, 28.0 - 13.0 * shift


def _paint_oesophagus(labels: LabelMap, grid: PhantomGrid, z: float, wall_mm: float) -> None:
    centre = oesophagus_centre(z)
    if centre is None:
        return
    outer = OESOPHAGUS_LUMEN_MM + wall_mm
    wall = Label.OESOPHAGUS_WALL
    if wall_mm > NORMAL_OESOPHAGEAL_WALL_MM + 1:
        wall = Label.OESOPHAGEAL_TUMOUR
    paint(labels, grid, Ellipse(*centre, outer, outer), wall)
    paint(labels, grid, Ellipse(*centre, OESOPHAGUS_LUMEN_MM, OESOPHAGUS_LUMEN_MM), Label.AIR)


def in_vertebral_body(z: float) -> bool:
    """True at the level of a vertebral body, False at an intervertebral disc."""
    offset = (z - L1_CENTRE_Z) % VERTEBRA_PITCH_MM
    return min(offset, VERTEBRA_PITCH_MM - offset) <= VERTEBRA_HALF_HEIGHT_MM


def _paint_spine(labels: LabelMap, grid: PhantomGrid, z: float) -> None:
    for side in (-1, 1):  # paraspinal (erector spinae) muscles
        paint(labels, grid, Ellipse(side * 35, 105, 25, 18), Label.MUSCLE)
    body = Ellipse(*VERTEBRA_XY, 22, 17)
    if in_vertebral_body(z):
        paint(labels, grid, body, Label.CORTICAL_BONE)
        cortex = 2.0  # cortical shell of a lumbar body is 1-2 mm
        inner = Ellipse(body.cx, body.cy, body.a - cortex, body.b - cortex)
        paint(labels, grid, inner, Label.TRABECULAR_BONE)
    else:
        paint(labels, grid, body, Label.DISC)
    paint(labels, grid, Ellipse(0, 98, 15, 12), Label.CORTICAL_BONE)  # neural arch
    paint(labels, grid, Ellipse(0, 118, 5, 12), Label.CORTICAL_BONE)  # spinous process
    paint(labels, grid, Ellipse(0, 97, 9, 8), Label.CSF)  # spinal canal


def _paint_ribs(labels: LabelMap, grid: PhantomGrid) -> None:
    for degrees in (140, 165, 190, 215):
        for mirror in (False, True):
            angle = math.radians(180 - degrees if mirror else degrees)
            centre = (143 * math.cos(angle), 10 + 105 * math.sin(angle))
            paint(labels, grid, Ellipse(*centre, 6, 6), Label.CORTICAL_BONE)


def _paint_mass(labels: LabelMap, grid: PhantomGrid, z: float, mass: Mass) -> None:
    depth = z - mass.z_mm
    if abs(depth) >= mass.radius_mm:
        return
    radius = math.sqrt(mass.radius_mm**2 - depth**2)
    pattern = MASS_PATTERNS[mass.mass_class]
    paint(labels, grid, Ellipse(mass.x_mm, mass.y_mm, radius, radius), Label.MASS_RIM)
    core = radius - pattern.rim_mm
    paint(labels, grid, Ellipse(mass.x_mm, mass.y_mm, core, core), Label.MASS_CORE)
    if pattern.nodules:
        for k in range(6):
            angle = math.radians(60 * k + 15)
            x = mass.x_mm + 0.78 * radius * math.cos(angle)
            y = mass.y_mm + 0.78 * radius * math.sin(angle)
            size = 0.2 * radius
            paint(labels, grid, Ellipse(x, y, size, size), Label.MASS_NODULE)
