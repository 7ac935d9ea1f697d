"""Nesting and literal-size bounds on what the sender controls: DICOM sequences and CLINICAL.

Recursion has a hard limit in Python; a 10,000-level sequence or a 100,000-level JSON
array hit it as a RecursionError, reported as an internal error, and a 5,000-digit
integer hit the int-parsing limit the same way. They are the request's fault, and are
refused as such, with the spec's limit named.
"""

from __future__ import annotations

import json
import re
import warnings
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset

from abdoserve.preprocessing.errors import (
    ClinicalInputError,
    InputTooLargeError,
    NestingTooDeepError,
)
from abdoserve.preprocessing.specs import IntakeLimits

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")
_NUMBER = re.compile(rb"-?[0-9][0-9.eE+\-]*")


def nested_too_deep(limits: IntakeLimits, index: int) -> NestingTooDeepError:
    return NestingTooDeepError(
        f"DICOM sequences are nested deeper than the limit of {limits.max_sequence_depth}",
        instance=index,
    )


def check_sequence_depth(dataset: Dataset, limit: int, index: int) -> None:
    """Refuse sequences nested deeper than `limit`, walking without recursion."""
    error = NestingTooDeepError(
        f"DICOM sequences are nested deeper than the limit of {limit}", instance=index
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # values pydicom converts here, as when parsing
            deepest = _deepest_sequence(dataset, limit)
    except RecursionError as cause:  # pydicom converting a raw sequence value recursively
        raise error from cause
    if deepest > limit:
        raise error


def _deepest_sequence(dataset: Dataset, limit: int) -> int:
    """The nesting depth of sequences, or limit + 1 as soon as it is exceeded."""
    pending: list[tuple[Dataset, int]] = [(dataset, 0)]
    deepest = 0
    while pending:
        current, depth = pending.pop()
        for item in _sequence_items(current):
            deepest = max(deepest, depth + 1)
            if deepest > limit:
                return deepest
            pending.append((item, depth + 1))
    return deepest


def _sequence_items(dataset: Dataset) -> list[Dataset]:
    items: list[Dataset] = []
    for element in dataset.elements():
        if element.VR == "SQ" or (element.VR is None and _dictionary_sq(element.tag)):
            try:
                value = dataset[element.tag].value  # converts a raw sequence, recursively
            except RecursionError:
                raise
            except Exception:  # a corrupt sequence: never read later, so it cannot nest
                continue
            items.extend(item for item in value or () if isinstance(item, Dataset))
    return items


def _dictionary_sq(tag: int) -> bool:
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False


def load_clinical_json(data: bytes, limits: IntakeLimits) -> dict[str, Any]:
    """CLINICAL: one JSON object within the size, depth and literal limits (empty: {})."""
    if len(data) > limits.max_clinical_bytes:
        raise InputTooLargeError(
            f"CLINICAL holds {len(data)} bytes, over the limit of {limits.max_clinical_bytes}"
        )
    if not data.strip():
        return {}
    _check_json_shape(data, limits)
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ClinicalInputError(
            f"input 'CLINICAL' is not valid JSON ({error.__class__.__name__})"
        ) from error
    if not isinstance(value, dict):
        raise ClinicalInputError("input 'CLINICAL' must be a JSON object")
    return value


def _check_json_shape(data: bytes, limits: IntakeLimits) -> None:
    """Depth and numeric literal length, measured on the text before any parsing."""
    bare = _STRING.sub(b'""', data)
    depth = deepest = 0
    for bracket in _BRACKETS.findall(bare):
        depth += 1 if bracket in b"[{" else -1
        deepest = max(deepest, depth)
    if deepest > limits.max_json_depth:
        raise NestingTooDeepError(
            f"CLINICAL nests arrays and objects deeper than the limit of {limits.max_json_depth}"
        )
    longest = max((len(match) for match in _NUMBER.findall(bare)), default=0)
    if longest > limits.max_number_chars:
        raise InputTooLargeError(
            f"CLINICAL holds a number of {longest} characters, over the limit of "
            f"{limits.max_number_chars}"
        )
