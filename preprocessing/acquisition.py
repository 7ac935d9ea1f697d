"""Where and when an image was acquired, read one way by the intake and the gateway.

- Where: a slice's position is its ImagePositionPatient projected on the slice normal,
  the cross product of ImageOrientationPatient's row and column direction cosines.
- When: DICOM TM (PS3.5 table 6.2-1: HH, HHMM, HHMMSS, HHMMSS.FFFFFF, and the ACR-NEMA
  "HH:MM:SS" form pydicom still reads) as seconds after midnight, and DA + TM as seconds
  on one scale across days. Times are compared as numbers of seconds, never as text or
  as the text's float: "1230" (12:30) is after "120000" (12:00:00).

Invalid text is refused with `AttributeProblem`, which names the attribute and never
echoes the value; a caller for whom a time is optional treats that as no time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from datetime import date

from abdoserve.preprocessing.errors import AttributeProblem

_TM = re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?")
_ACR_NEMA_TM = re.compile(r"(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?")
_DA = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})")  # YYYYMMDD, or ACR-NEMA YYYY.MM.DD
_TM_FORMS = "is not a DICOM time (HH, HHMM, HHMMSS or HHMMSS.FFFFFF)"
_DA_FORMS = "is not a DICOM date (YYYYMMDD)"
_PADDING = " \x00"  # TM and DA are padded to even length with spaces (NUL in the wild)
DAY_S = 86400.0


def slice_normal(orientation: Sequence[float]) -> tuple[float, float, float]:
    """The unit normal (row x column) of ImageOrientationPatient's six direction cosines;
    the zero vector where the row and column are parallel."""
    (rx, ry, rz), (cx, cy, cz) = orientation[:3], orientation[3:6]
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    length = math.sqrt(sum(value * value for value in normal)) or 1.0
    nx, ny, nz = (value / length for value in normal)
    return (nx, ny, nz)


def toward_head(normal: Iterable[float]) -> tuple[float, float, float]:
    """`normal`, flipped where it points to the feet (-z of the patient coordinates, LPS)."""
    nx, ny, nz = (float(value) for value in normal)
    sign = -1.0 if nz < 0 else 1.0
    return (sign * nx, sign * ny, sign * nz)


def position_along(position: Iterable[float], normal: Iterable[float]) -> float:
    """A slice's position in mm along `normal` (ImagePositionPatient . normal)."""
    return float(sum(float(p) * float(n) for p, n in zip(position, normal, strict=True)))


def time_seconds(text: str, tag: int) -> float:
    """A TM value of the attribute `tag` in seconds after midnight (60 s allowed for a
    leap second, as the standard does). Raises AttributeProblem for any other text."""
    value = text.strip(_PADDING)
    found = _TM.fullmatch(value) or _ACR_NEMA_TM.fullmatch(value)
    if found is None:
        raise AttributeProblem(tag, _TM_FORMS)
    hours, minutes, seconds, fraction = found.groups()
    if int(hours) > 23 or int(minutes or 0) > 59 or int(seconds or 0) > 60:
        raise AttributeProblem(tag, _TM_FORMS)
    total = int(hours) * 3600 + int(minutes or 0) * 60 + int(seconds or 0)
    return total + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


def date_time_seconds(date_text: str, date_tag: int, time_text: str, time_tag: int) -> float:
    """A DA and a TM value together, in seconds on one scale across days (from 0001-01-01),
    so that 00:00:30 of the next day is after 23:59:50. Raises AttributeProblem naming
    whichever attribute is not valid."""
    found = _DA.fullmatch(date_text.strip(_PADDING))
    if found is None:
        raise AttributeProblem(date_tag, _DA_FORMS)
    try:
        day = date(*(int(part) for part in found.groups())).toordinal()
    except ValueError as error:  # a month 13 or a 30 February
        raise AttributeProblem(date_tag, _DA_FORMS) from error
    return day * DAY_S + time_seconds(time_text, time_tag)
