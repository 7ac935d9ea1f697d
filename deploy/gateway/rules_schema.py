"""The routing rules file: read from YAML or JSON and validated into frozen rules at load.

A hospital integrator edits this file, so every mistake is refused when the gateway
starts, never at the first study: unknown keys (a typo must not pass silently), repeated
keys, wrong types, counts the task cannot take, clinical inputs the task does not have.
Each message names the file, the rule (its number, counting from 1, and its name) and
the field: "rules.yaml: rule 2 'bone': select.count must be an integer 1..32, got 'x'".
Messages quote the rules file's own values only.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, cast

import yaml

from abdoserve.preprocessing.clinical import ROI_KEY, clinical_value
from abdoserve.preprocessing.errors import ClinicalInputError
from abdoserve.preprocessing.specs import RoiCrop, TaskSpec

Scope = Literal["series", "study"]
Method = Literal["all", "evenly_spaced", "levels", "phases"]

SCOPES: tuple[Scope, ...] = ("series", "study")
METHODS: tuple[Method, ...] = ("all", "evenly_spaced", "levels", "phases")
DEFAULT_FRACTIONS = (0.25, 0.5, 0.75)
DEFAULT_TOLERANCE_MM = 5.0
# The one header attribute each clinical input may be read from; the others
# (hbv, hcv, roi) are in no header: only a default supplies them.
HEADER_SOURCES = {
    "age": "PatientAge",
    "sex": "PatientSex",
    "field_strength": "MagneticFieldStrength",
}
RULE_KEYS = ("name", "task", "scope", "match", "select", "clinical")
MATCH_KEYS = (
    "Modality",
    "BodyPartExamined",
    "SeriesDescription",
    "ImageType",
    "contrast",
    "SliceThickness",
)
SELECT_KEYS: Mapping[Method, tuple[str, ...]] = {
    "all": ("method", "z_range"),
    "evenly_spaced": ("method", "count", "z_range"),
    "levels": ("method", "fractions", "z_range"),
    "phases": ("method", "count", "z_mm", "tolerance_mm"),
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}")
_MODALITY = re.compile(r"[A-Z0-9_]{1,16}")  # a DICOM code string, upper case
_SHOWN_CHARS = 60


class RulesError(ValueError):
    """The rules file is invalid; the message names the file, rule and field."""


@dataclass(frozen=True)
class Range:
    """An inclusive range in mm; None leaves that side open."""

    minimum: float | None
    maximum: float | None

    def holds(self, value: float) -> bool:
        above = self.minimum is None or value >= self.minimum
        return above and (self.maximum is None or value <= self.maximum)


@dataclass(frozen=True)
class ImageTypeMatch:
    """Every `includes` pattern matches some value; no `excludes` pattern matches any."""

    includes: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Match:
    """Criteria on series-level attributes; None: not a criterion. Patterns are
    lower-cased here and matched against lower-cased values (case-insensitive)."""

    modality: tuple[str, ...] | None = None
    body_part: tuple[str, ...] | None = None
    series_description: tuple[str, ...] | None = None
    image_type: ImageTypeMatch | None = None
    contrast: bool | None = None
    slice_thickness: Range | None = None


@dataclass(frozen=True)
class Select:
    """How a request's images are picked; which fields apply depends on `method`."""

    method: Method
    count: int = 0  # evenly_spaced: at most; phases: the number of series
    z_range: tuple[float, float] | None = None
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    z_mm: float | None = None
    tolerance_mm: float = DEFAULT_TOLERANCE_MM


_ABSENT = object()


@dataclass(frozen=True)
class Source:
    """Where a clinical input comes from: a header attribute, then a default."""

    header: str | None = None
    default: object = _ABSENT

    @property
    def has_default(self) -> bool:
        return self.default is not _ABSENT


@dataclass(frozen=True)
class Rule:
    number: int  # from 1, in file order
    name: str
    task: TaskSpec
    scope: Scope
    match: Match
    select: Select
    clinical: Mapping[str, Source] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def label(self) -> str:
        return f"rule {self.number} {self.name!r}"


def task_inputs(spec: TaskSpec) -> tuple[str, ...]:
    """The clinical keys the server takes for a task: its inputs, and `roi` for an ROI crop."""
    names = tuple(item.name for item in spec.clinical_inputs)
    return (*names, ROI_KEY) if isinstance(spec.geometry, RoiCrop) else names


# --- reading the file ------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader (no object construction) that refuses a repeated key, which
    safe_load would let overwrite the first silently."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str | int | float | bool):
            continue  # SafeLoader refuses an unhashable key itself
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"repeated key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_document(path: Path) -> object:
    """The file's content: YAML for .yaml/.yml, JSON for .json."""
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise RulesError(f"{path}: a rules file ends in .yaml, .yml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise RulesError(f"{path}: cannot read the rules file: {reason}") from error
    return _parse_json(path, text) if suffix == ".json" else _parse_yaml(path, text)


def _parse_yaml(path: Path, text: str) -> object:
    try:
        # A SafeLoader subclass: the same safety as yaml.safe_load, plus repeated keys refused.
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RulesError(f"{path}: not valid YAML{where}: {error.problem}") from error
    except yaml.YAMLError as error:
        raise RulesError(f"{path}: not valid YAML: {error}") from error


def _parse_json(path: Path, text: str) -> object:
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise RulesError(f"{path}: repeated key {repeated[0]!r}")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=unique)
    except json.JSONDecodeError as error:
        where = f"at line {error.lineno}, column {error.colno}"
        raise RulesError(f"{path}: not valid JSON {where}: {error.msg}") from error


# --- validation ------------------------------------------------------------------------


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


@dataclass(frozen=True)
class _Where:
    """Builds the errors of one place in the file: the file, then the rule if any."""

    file: str
    rule: str = ""

    def error(self, subject: str, problem: str, value: object = _ABSENT) -> RulesError:
        got = "" if value is _ABSENT else f", got {_show(value)}"
        place = ": ".join(part for part in (self.file, self.rule) if part)
        return RulesError(f"{place}: {subject} {problem}{got}")


def _mapping(
    where: _Where, subject: str, value: object, allowed: Sequence[str], required: Sequence[str]
) -> dict[str, Any]:
    """A mapping with only `allowed` keys and every `required` one."""
    if not isinstance(value, dict):
        raise where.error(subject, "must be a mapping", value)
    unknown = sorted(str(key) for key in value if key not in allowed)
    if unknown:
        known = ", ".join(allowed)
        raise where.error(subject, f"has unknown key {unknown[0]!r}; allowed: {known}")
    absent = [key for key in required if key not in value]
    if absent:
        raise where.error(subject, f"needs {absent[0]!r}")
    return cast(dict[str, Any], value)


def _number(where: _Where, subject: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise where.error(subject, "must be a number", value)
    return float(value)


def _integer(where: _Where, subject: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        span = f"{low}" if low == high else f"an integer {low}..{high}"
        raise where.error(subject, f"must be {span}", value)
    return value


def _strings(where: _Where, subject: str, value: object, what: str) -> tuple[str, ...]:
    """One non-empty string or a non-empty list of them."""
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(item, str) and item.strip() for item in items):
        raise where.error(subject, f"must be {what} or a list of them", value)
    return tuple(str(item).strip() for item in items)


def _patterns(where: _Where, subject: str, value: object) -> tuple[str, ...]:
    return tuple(item.lower() for item in _strings(where, subject, value, "a pattern"))


def parse_rules(document: object, file: str, tasks: Mapping[str, TaskSpec]) -> tuple[Rule, ...]:
    """Validate the whole document into rules, in file order."""
    top = _Where(file)
    if document is None:
        raise top.error("the file", "is empty: it needs a 'rules' list")
    body = _mapping(top, "the file", document, ("rules",), ("rules",))
    entries = body["rules"]
    if not isinstance(entries, list) or not entries:
        raise top.error("rules", "must be a non-empty list", entries)
    rules: list[Rule] = []
    for number, entry in enumerate(entries, start=1):
        rule = _rule(_Where(file, f"rule {number}"), number, entry, tasks)
        earlier = next((item for item in rules if item.name == rule.name), None)
        if earlier is not None:
            raise _Where(file, rule.label).error("name", f"is already used by {earlier.label}")
        rules.append(rule)
    return tuple(rules)


def _rule(where: _Where, number: int, entry: object, tasks: Mapping[str, TaskSpec]) -> Rule:
    if not isinstance(entry, dict):
        raise where.error("the rule", "must be a mapping", entry)
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        detail = "1-64 letters, digits, spaces, '_', '.' or '-', starting with a letter or digit"
        raise where.error("name", f"must be {detail}", name)
    where = _Where(where.file, f"rule {number} {name!r}")
    body = _mapping(where, "the rule", entry, RULE_KEYS, ("name", "task", "match", "select"))
    task = body["task"]
    if task not in tasks:
        raise where.error("task", f"must be one of {', '.join(tasks)}", task)
    spec = tasks[task]
    scope = body.get("scope", "series")
    if scope not in SCOPES:
        raise where.error("scope", "must be series or study", scope)
    select = _select(where, body["select"], spec)
    if (scope == "study") != (select.method == "phases"):
        raise where.error("scope", "study goes with select.method phases, and only with it")
    match = _match(where, body["match"])
    if match.modality is not None and set(match.modality) != {spec.modality}:
        shown = body["match"]["Modality"]
        raise where.error("match.Modality", f"must be {spec.modality} for {spec.name}", shown)
    clinical = _clinical(where, body.get("clinical", {}), spec)
    return Rule(number, name, spec, scope, match, select, clinical)


def _match(where: _Where, value: object) -> Match:
    body = _mapping(where, "match", value, MATCH_KEYS, ())
    if not body:
        raise where.error("match", "needs at least one criterion")
    modality = None
    if "Modality" in body:
        modality = _strings(where, "match.Modality", body["Modality"], "a modality code")
        bad = [code for code in modality if not _MODALITY.fullmatch(code)]
        if bad:
            raise where.error("match.Modality", "must be upper-case codes such as CT or MR", bad[0])
    contrast = body.get("contrast")
    if contrast is not None and not isinstance(contrast, bool):
        raise where.error("match.contrast", "must be true or false", contrast)
    return Match(
        modality=modality,
        body_part=_optional_patterns(where, body, "BodyPartExamined"),
        series_description=_optional_patterns(where, body, "SeriesDescription"),
        image_type=_image_type(where, body.get("ImageType")),
        contrast=contrast,
        slice_thickness=_thickness(where, body.get("SliceThickness")),
    )


def _optional_patterns(where: _Where, body: dict[str, Any], key: str) -> tuple[str, ...] | None:
    return _patterns(where, f"match.{key}", body[key]) if key in body else None


def _image_type(where: _Where, value: object) -> ImageTypeMatch | None:
    if value is None:
        return None
    body = _mapping(where, "match.ImageType", value, ("includes", "excludes"), ())
    if not body:
        raise where.error("match.ImageType", "needs includes, excludes or both")
    found = {
        key: _patterns(where, f"match.ImageType.{key}", body[key]) if key in body else ()
        for key in ("includes", "excludes")
    }
    return ImageTypeMatch(found["includes"], found["excludes"])


def _thickness(where: _Where, value: object) -> Range | None:
    if value is None:
        return None
    subject = "match.SliceThickness"
    body = _mapping(where, subject, value, ("min", "max"), ())
    if not body:
        raise where.error(subject, "needs min, max or both (mm)")
    bounds = {key: _number(where, f"{subject}.{key}", body[key]) for key in body}
    if any(bound < 0 for bound in bounds.values()):
        raise where.error(subject, "bounds must not be negative (mm)", value)
    found = Range(bounds.get("min"), bounds.get("max"))
    if found.minimum is not None and found.maximum is not None and found.minimum > found.maximum:
        raise where.error(subject, "min must not exceed max", value)
    return found


def _select(where: _Where, value: object, spec: TaskSpec) -> Select:
    method = value.get("method") if isinstance(value, dict) else None
    if method not in METHODS:
        shown = method if isinstance(value, dict) else value
        raise where.error("select.method", f"must be one of {', '.join(METHODS)}", shown)
    method = cast(Method, method)
    body = _mapping(where, "select", value, SELECT_KEYS[method], ())
    low, high = spec.images.min_images, spec.images.max_images
    z_range = _z_range(where, body.get("z_range"))
    if method == "all":
        return Select(method, z_range=z_range)
    if method == "levels":
        fractions = _fractions(where, body.get("fractions", list(DEFAULT_FRACTIONS)), spec)
        return Select(method, z_range=z_range, fractions=fractions)
    if "count" not in body:
        raise where.error("select", f"needs 'count' for method {method}")
    count = _integer(where, "select.count", body["count"], low, high)
    if method == "evenly_spaced":
        return Select(method, count=count, z_range=z_range)
    given = body.get("tolerance_mm", DEFAULT_TOLERANCE_MM)
    tolerance = _number(where, "select.tolerance_mm", given)
    if tolerance <= 0:
        raise where.error("select.tolerance_mm", "must be positive (mm)", given)
    z_mm = _number(where, "select.z_mm", body["z_mm"]) if "z_mm" in body else None
    return Select(method, count=count, z_mm=z_mm, tolerance_mm=tolerance)


def _z_range(where: _Where, value: object) -> tuple[float, float] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise where.error("select.z_range", "must be [min_mm, max_mm]", value)
    low, high = (_number(where, "select.z_range", item) for item in value)
    if low >= high:
        raise where.error("select.z_range", "must have min_mm below max_mm", value)
    return (low, high)


def _fractions(where: _Where, value: object, spec: TaskSpec) -> tuple[float, ...]:
    subject = "select.fractions"
    if not isinstance(value, list):
        raise where.error(subject, "must be a list of numbers 0..1", value)
    fractions = tuple(_number(where, subject, item) for item in value)
    if not all(0.0 <= item <= 1.0 for item in fractions):
        raise where.error(subject, "must lie within 0..1 (0 = the cranial end)", value)
    if any(later <= earlier for earlier, later in itertools.pairwise(fractions)):
        raise where.error(subject, "must ascend (cranial to caudal)", value)
    low, high = spec.images.min_images, spec.images.max_images
    if not low <= len(fractions) <= high:
        span = f"{low}" if low == high else f"{low}..{high}"
        raise where.error(subject, f"must hold {span} levels for {spec.name}", value)
    return fractions


def _clinical(where: _Where, value: object, spec: TaskSpec) -> Mapping[str, Source]:
    names = task_inputs(spec)
    if not isinstance(value, dict):
        raise where.error("clinical", "must be a mapping", value)
    unknown = sorted(str(key) for key in value if key not in names)
    if unknown:
        known = f"its inputs: {', '.join(names)}" if names else "it has none"
        raise where.error("clinical", f"has {unknown[0]!r}, not an input of {spec.name}; {known}")
    sources = {name: _source(where, name, value[name], spec) for name in names if name in value}
    return MappingProxyType(sources)


def _source(where: _Where, name: str, value: object, spec: TaskSpec) -> Source:
    subject = f"clinical.{name}"
    body = _mapping(where, subject, value, ("from", "default"), ())
    if not body:
        raise where.error(subject, "needs 'from' (a header attribute), 'default' or both")
    header = body.get("from")
    if "from" in body:
        expected = HEADER_SOURCES.get(name)
        if expected is None:
            raise where.error(
                f"{subject}.from", "is not possible: no header holds it; give a default"
            )
        if header != expected:
            raise where.error(f"{subject}.from", f"must be {expected}", header)
    if "default" not in body:
        return Source(header=header)
    return Source(header=header, default=_default(where, name, body["default"], spec))


def _default(where: _Where, name: str, value: object, spec: TaskSpec) -> object:
    """A default checked as the server would check the request's value."""
    subject = f"clinical.{name}.default"
    if name == ROI_KEY:
        return _roi(where, subject, value)
    item = spec.clinical_input(name)
    if item.kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise where.error(subject, "must be a number", value)
        problem = f"must lie within {item.minimum:g}..{item.maximum:g} {item.unit}".rstrip()
    else:
        if not isinstance(value, str):
            raise where.error(subject, f"must be one of {', '.join(item.choices)}", value)
        problem = f"must be one of {', '.join(item.choices)}"
    try:
        clinical_value(item, value)
    except ClinicalInputError as error:
        raise where.error(subject, problem, value) from error
    return value


def _roi(where: _Where, subject: str, value: object) -> list[float | int]:
    shape = "must be four numbers [row_min, col_min, row_max, col_max]"
    if not isinstance(value, list) or len(value) != 4:
        raise where.error(subject, shape, value)
    numbers = [_number(where, subject, item) for item in value]
    row_min, col_min, row_max, col_max = numbers
    if min(numbers) < 0 or row_min >= row_max or col_min >= col_max:
        raise where.error(
            subject, "must have 0 <= row_min < row_max and 0 <= col_min < col_max", value
        )
    return [int(item) if float(item).is_integer() else float(item) for item in value]
