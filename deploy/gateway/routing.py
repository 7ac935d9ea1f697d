"""Declarative routing: which task each series of a study goes to, with which images
and which clinical inputs (the rules file format: rules.example.yaml).

Rules are tried in file order and the first whose `match` admits a series takes it; a
series no rule admits is listed as unmatched. A `scope: series` rule (the default) makes
one request per series it takes; a `scope: study` rule makes one request of all the
series it takes (the phases of a dynamic CT). Matching reads the series' reference
instance (the lowest InstanceNumber); an attribute that is missing or unreadable fails
its criterion, never the routing.

A request that cannot be sent carries its reason in `problem` (too few images, too few
series) and no instances; a request whose clinical inputs are in neither the header nor
a default lists them in `missing`. Both are "needs input" for the gateway, which must
never guess. Nothing here puts a header value other than UIDs into a message or log.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from abdoserve.deploy.gateway.rules_schema import (
    Match,
    Rule,
    RulesError,
    Source,
    parse_rules,
    read_document,
    task_inputs,
)
from abdoserve.deploy.gateway.selection import (
    Picked,
    frame_count,
    header_number,
    header_text,
    header_texts,
    phase_of,
    pick_all,
    pick_evenly_spaced,
    pick_levels,
    pick_multiframe,
    pick_phases,
    reference_instance,
    stack_of,
)
from abdoserve.preprocessing.clinical import clinical_value
from abdoserve.preprocessing.errors import ClinicalInputError
from abdoserve.preprocessing.specs import TaskSpec
from abdoserve.preprocessing.tasks import TASKS

__all__ = ["RoutedRequest", "RuleSet", "RulesError", "StudyRouting", "load_rules"]

log = logging.getLogger(__name__)

# ContrastBolusAgent values that scanners write for "no contrast" (the element is Type 2,
# so some write it empty, others a word): the element's presence alone would misroute.
NO_AGENT = frozenset({"none", "no", "n", "nil", "-"})
_AGE = re.compile(r"(\d{3})([DWMY])")
_PER_YEAR = {"D": 365.25, "W": 365.25 / 7.0, "M": 12.0, "Y": 1.0}


@dataclass(frozen=True)
class RoutedRequest:
    rule: str  # the rule's name
    task: str  # one of the five task names
    series_uids: tuple[str, ...]  # the series its images came from
    instances: tuple[str, ...]  # SOP Instance UIDs of the chosen images, in the order to send
    clinical: dict[str, Any]  # the task's clinical inputs (JSON-ready), as the client sends them
    missing: tuple[str, ...]  # clinical inputs in neither the header nor a default: needs input
    problem: str | None = None  # why no images can be sent (then `instances` is empty)


@dataclass(frozen=True)
class StudyRouting:
    requests: tuple[RoutedRequest, ...]
    unmatched: tuple[str, ...]  # Series Instance UIDs no rule matched


class RuleSet:
    """Validated rules in file order; routes the series of one study."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)

    def route_study(self, series: Mapping[str, Sequence[Dataset]]) -> StudyRouting:
        """series: Series Instance UID -> the headers of every instance received of it."""
        taken: dict[int, list[str]] = {}
        unmatched: list[str] = []
        for series_uid, datasets in series.items():
            reference = reference_instance(datasets)
            rule = None if reference is None else self._first_match(reference)
            if rule is None:
                unmatched.append(series_uid)
            else:
                taken.setdefault(rule.number, []).append(series_uid)
        requests: list[RoutedRequest] = []
        for rule in self.rules:
            uids = taken.get(rule.number, [])
            if rule.scope == "study" and uids:
                requests.append(_study_request(rule, {uid: series[uid] for uid in uids}))
            elif rule.scope == "series":
                requests.extend(_series_request(rule, uid, series[uid]) for uid in uids)
        for request in requests:
            _log_request(request)
        if unmatched:
            log.debug("no rule matched series %s", ", ".join(unmatched))
        return StudyRouting(tuple(requests), tuple(unmatched))

    def matching_rule(self, header: Dataset) -> str | None:
        """The name of the first rule whose match admits this header, else None (the SCP
        asks before storing an instance, standing for its series)."""
        rule = self._first_match(header)
        return None if rule is None else rule.name

    def _first_match(self, reference: Dataset) -> Rule | None:
        return next((rule for rule in self.rules if matches(rule.match, reference)), None)


def load_rules(path: Path, tasks: Mapping[str, TaskSpec] | None = None) -> RuleSet:
    """The rules file (YAML or JSON by suffix), validated now: RulesError names the file,
    rule and field. `tasks`: the task specs to check against (a site's overridden specs);
    the five seed tasks by default."""
    known = TASKS if tasks is None else tasks
    return RuleSet(parse_rules(read_document(path), str(path), known))


# --- matching --------------------------------------------------------------------------


def matches(match: Match, ds: Dataset) -> bool:
    """Whether every criterion the rule gives holds for the series' reference instance."""
    return all(check(match, ds) for check in _CHECKS)


def _any_pattern(patterns: Sequence[str], value: str) -> bool:
    return any(fnmatch.fnmatchcase(value.lower(), pattern) for pattern in patterns)


def _text_criterion(keyword: str, patterns: Sequence[str] | None, ds: Dataset) -> bool:
    if patterns is None:
        return True
    value = header_text(ds, keyword)
    return value is not None and _any_pattern(patterns, value)


def _modality(match: Match, ds: Dataset) -> bool:
    return match.modality is None or header_text(ds, "Modality") in match.modality


def _body_part(match: Match, ds: Dataset) -> bool:
    return _text_criterion("BodyPartExamined", match.body_part, ds)


def _description(match: Match, ds: Dataset) -> bool:
    return _text_criterion("SeriesDescription", match.series_description, ds)


def _image_type(match: Match, ds: Dataset) -> bool:
    criterion = match.image_type
    if criterion is None:
        return True
    values = header_texts(ds, "ImageType")
    if values is None:
        return False
    included = all(
        any(_any_pattern([pattern], value) for value in values) for pattern in criterion.includes
    )
    excluded = any(_any_pattern(criterion.excludes, value) for value in values)
    return included and not excluded


def has_contrast(ds: Dataset) -> bool:
    """Contrast was given: ContrastBolusAgent (0018,0010) holds an agent, not a 'none' word."""
    agent = header_text(ds, "ContrastBolusAgent")
    return agent is not None and agent.lower() not in NO_AGENT


def _contrast(match: Match, ds: Dataset) -> bool:
    return match.contrast is None or has_contrast(ds) == match.contrast


def _thickness(match: Match, ds: Dataset) -> bool:
    if match.slice_thickness is None:
        return True
    value = header_number(ds, "SliceThickness")
    if value is None:  # an Enhanced CT/MR keeps it in its shared functional groups
        value = shared_slice_thickness(ds)
    return value is not None and match.slice_thickness.holds(value)


def shared_slice_thickness(ds: Dataset) -> float | None:
    """(0018,0050) from the Shared Functional Groups' Pixel Measures, where present."""
    try:
        measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        return float(measures.SliceThickness)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None


_CHECKS: tuple[Callable[[Match, Dataset], bool], ...] = (
    _modality,
    _body_part,
    _description,
    _image_type,
    _contrast,
    _thickness,
)


# --- requests --------------------------------------------------------------------------


def _series_request(rule: Rule, series_uid: str, datasets: Sequence[Dataset]) -> RoutedRequest:
    stack = stack_of(datasets)
    select, images = rule.select, rule.task.images
    if any(frame_count(ds) > 1 for ds in datasets):
        picked = pick_multiframe(datasets, images.min_images, images.max_images)
    elif select.method == "all":
        picked = pick_all(stack, images.min_images, images.max_images, select.z_range)
    elif select.method == "evenly_spaced":
        picked = pick_evenly_spaced(stack, select.count, images.min_images, select.z_range)
    else:
        picked = pick_levels(stack, select.fractions, select.z_range)
    return _request(rule, (series_uid,), picked, reference_instance(datasets))


def _study_request(rule: Rule, series: Mapping[str, Sequence[Dataset]]) -> RoutedRequest:
    phases = [phase_of(uid, datasets) for uid, datasets in series.items()]
    select = rule.select
    uids, picked = pick_phases(phases, select.count, select.z_mm, select.tolerance_mm)
    return _request(rule, uids, picked, reference_instance(series[uids[0]]))


def _request(
    rule: Rule, series_uids: tuple[str, ...], picked: Picked, reference: Dataset | None
) -> RoutedRequest:
    clinical, missing = clinical_inputs(rule, reference)
    return RoutedRequest(
        rule=rule.name,
        task=rule.task.name,
        series_uids=series_uids,
        instances=picked.instances,
        clinical=clinical,
        missing=missing,
        problem=picked.problem,
    )


def _log_request(request: RoutedRequest) -> None:
    """Rule, task, UIDs and counts, never a header value (DEBUG: the gateway logs outcomes)."""
    series = ", ".join(request.series_uids)
    if request.problem:
        log.debug(
            "rule %r (%s), series %s: %s", request.rule, request.task, series, request.problem
        )
    elif request.missing:
        names = ", ".join(request.missing)
        log.debug("rule %r (%s), series %s: needs %s", request.rule, request.task, series, names)
    else:
        count = len(request.instances)
        log.debug("rule %r (%s), series %s: %d images", request.rule, request.task, series, count)


# --- clinical inputs -------------------------------------------------------------------


def clinical_inputs(rule: Rule, ds: Dataset | None) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The task's inputs from the header, else the rule's defaults; the rest are missing.

    An input the server reads from the header itself (field strength) may be left out of
    the rule: then it is neither sent nor missing.
    """
    values: dict[str, Any] = {}
    missing: list[str] = []
    fallback = {item.name for item in rule.task.clinical_inputs if item.dicom_fallback}
    for name in task_inputs(rule.task):
        source = rule.clinical.get(name)
        if source is None and name in fallback:
            continue
        value = None if source is None else _value(rule.task, name, source, ds)
        if value is None:
            missing.append(name)
        else:
            values[name] = value
    return values, tuple(missing)


def _value(spec: TaskSpec, name: str, source: Source, ds: Dataset | None) -> Any:
    """The header's value if it is present and valid, else the default, else None."""
    if source.header is not None and ds is not None:
        found = HEADER_READERS[source.header](ds)
        if found is not None and _valid(spec, name, found):
            return found
    return source.default if source.has_default else None


def _valid(spec: TaskSpec, name: str, value: object) -> bool:
    """A header value the server would refuse (an age of 150) is no value at all."""
    try:
        clinical_value(spec.clinical_input(name), value)
    except ClinicalInputError:
        return False
    return True


def patient_age(ds: Dataset) -> float | int | None:
    """PatientAge (AS, nnnD/W/M/Y) in years: "061Y" -> 61, "006M" -> 0.5."""
    text = header_text(ds, "PatientAge")
    found = _AGE.fullmatch(text) if text else None
    if found is None:
        return None
    years = int(found[1]) / _PER_YEAR[found[2]]
    return int(years) if years.is_integer() else round(years, 3)


def patient_sex(ds: Dataset) -> str | None:
    """PatientSex M or F; O (other) or empty is no value: the model takes only M or F."""
    text = header_text(ds, "PatientSex")
    return text if text in ("M", "F") else None


def field_strength(ds: Dataset) -> float | None:
    """MagneticFieldStrength (0018,0087) in tesla."""
    return header_number(ds, "MagneticFieldStrength")


HEADER_READERS: Mapping[str, Callable[[Dataset], Any]] = {
    "PatientAge": patient_age,
    "PatientSex": patient_sex,
    "MagneticFieldStrength": field_strength,
}
