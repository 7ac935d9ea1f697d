"""Fast reads of the few header values preprocessing needs, by tag.

pydicom converts a raw element into a validated value object on first access
(DSfloat, IS, MultiValue), which costs more per slice than resampling the
pixels. These readers parse the raw bytes of the handful of attributes we use
directly, and fall back to pydicom's value where the element is already converted.
"""

from __future__ import annotations

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException

from abdoserve.preprocessing.errors import AttributeProblem

_PADDING = b" \x00"


def text(dataset: Dataset, tag: int) -> str | None:
    """A string attribute (CS, TM, UI, ...) without padding; None when absent or empty."""
    element = _element(dataset, tag)
    if element is None:
        return None
    if isinstance(element, RawDataElement):
        raw = element.value
        value = raw.strip(_PADDING).decode("ascii", "replace") if raw is not None else ""
    else:
        value = "" if element.value is None else str(element.value).strip()
    return value or None


def numbers(dataset: Dataset, tag: int, index: int) -> tuple[float, ...] | None:
    """A decimal/integer string attribute (DS, IS), all its values; None when absent."""
    element = _element(dataset, tag)
    if element is None:
        return None
    parts: list[str | bytes | float]
    if isinstance(element, RawDataElement):
        raw = element.value
        parts = list(raw.strip(_PADDING).split(b"\\")) if raw else []
    else:
        value = element.value
        parts = [value] if isinstance(value, str | bytes | int | float) else list(value)
    if not parts:
        return None
    try:
        return tuple(float(part) for part in parts)
    except (TypeError, ValueError) as error:
        raise AttributeProblem(tag, "holds values that are not numbers", instance=index) from error


def number(dataset: Dataset, tag: int, index: int) -> float | None:
    """The first value of a DS/IS attribute."""
    values = numbers(dataset, tag, index)
    return values[0] if values else None


def present(dataset: Dataset, tag: int) -> bool:
    """The attribute exists and holds a value."""
    return _element(dataset, tag) is not None


def unsigned(dataset: Dataset, tag: int, default: int, index: int) -> int:
    """A US attribute (Rows, Bits Allocated, ...); `default` when absent."""
    element = _element(dataset, tag)
    if element is None:
        return default
    if isinstance(element, RawDataElement) and element.VR in (None, "US"):
        raw = element.value
        if raw is None or len(raw) < 2:
            return default
        return int.from_bytes(raw[:2], "little" if element.is_little_endian else "big")
    try:  # a raw element of another VR is converted here, which can fail on garbage
        value = element.value if isinstance(element, DataElement) else dataset[tag].value
        return int(value)
    except (TypeError, ValueError, NotImplementedError, BytesLengthException) as error:
        raise AttributeProblem(tag, "is not an integer", instance=index) from error


def raw_bytes(dataset: Dataset, tag: int) -> bytes | None:
    """An OB/OW value (Pixel Data) as bytes, without pydicom's element conversion."""
    element = _element(dataset, tag)
    value = None if element is None else element.value
    return value if isinstance(value, bytes) else None


def _element(dataset: Dataset, tag: int) -> RawDataElement | DataElement | None:
    try:  # keep_deferred: never convert here (an unknown VR would raise)
        element = dataset.get_item(tag, keep_deferred=True)
    except KeyError:
        return None
    if element is None or element.value in (None, b"", ""):
        return None
    return element
