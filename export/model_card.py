"""The model card of one imported `_net` version: `card.json` beside `provenance.json`.

Written by `abdoserve model import` (export/model_import.py) and checked when written
and when read: every field present, nothing unknown, the source's SHA-256 64 hex
digits, the framework one of `FRAMEWORKS`, the time UTC, the parity figure present
and within its tolerance wherever a source framework was there to compare with, and
the card id equal to the hash of the content. `acceptance` stays null until
`abdoserve model validate` fills it; the id does not cover it (nor itself), so a card
keeps its id once validated.

The hospital's own words (`intended_use`, `training_data`) are required fields whose
value says `not given` where the hospital gave none: a reader never has to guess
whether an empty field means "none" or "not asked".
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from abdoserve.export.errors import ExportError

SCHEMA = "abdoserve-model-card/1"
CARD_FILE = "card.json"
NOT_GIVEN = "not given"
FRAMEWORKS = ("onnx", "pytorch", "torchscript", "chainer")
# The frameworks the importer can run itself: their cards carry an eager-vs-served figure.
EAGER_FRAMEWORKS = ("pytorch", "torchscript", "chainer")
CARD_ID_LENGTH = 12
_SHA256 = re.compile(r"[0-9a-f]{64}")
_UTC_TIME = "%Y-%m-%dT%H:%M:%SZ"
# Fields the card id leaves out: itself, and what a later step fills in.
_UNHASHED = ("card_id", "acceptance")


class ModelCardError(ExportError):
    """A card is missing a field, holds a value it may not, or was altered."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ModelCardError(message)


@dataclass(frozen=True)
class Source:
    """The file the hospital gave: its name (no folder), its bytes' hash, what wrote it."""

    file_name: str
    sha256: str
    framework: str

    def __post_init__(self) -> None:
        _require(
            bool(self.file_name) and "/" not in self.file_name,
            f"source.file_name must be a bare file name, got {self.file_name!r}",
        )
        _require(
            bool(_SHA256.fullmatch(self.sha256)),
            f"source.sha256 must be 64 lowercase hex digits, got {self.sha256!r}",
        )
        _require(
            self.framework in FRAMEWORKS,
            f"source.framework must be one of {', '.join(FRAMEWORKS)}, got {self.framework!r}",
        )


@dataclass(frozen=True)
class Importer:
    """Which abdoserve wrote the version, and when (UTC, to the second)."""

    name: str
    version: str
    imported_at: str

    def __post_init__(self) -> None:
        _require(bool(self.name) and bool(self.version), "importer.name and version are required")
        try:
            datetime.strptime(self.imported_at, _UTC_TIME)
        except (TypeError, ValueError):
            raise ModelCardError(
                f"importer.imported_at must be UTC as YYYY-MM-DDTHH:MM:SSZ, "
                f"got {self.imported_at!r}"
            ) from None


@dataclass(frozen=True)
class SpecDifference:
    """One spec value the served task holds that is not the task's default."""

    field: str  # dotted path, e.g. geometry.matrix
    default: Any  # the task's default value (JSON)
    default_source: str  # where the default comes from: "paper" or "serving choice"
    served: Any  # what the repository's spec (its overrides) holds

    def __post_init__(self) -> None:
        _require(bool(self.field), "spec_differences[].field is required")
        _require(self.default != self.served, f"{self.field}: default and served are equal")


@dataclass(frozen=True)
class SelfCheck:
    """The graph run once by ONNX Runtime on a phantom study, before anything else."""

    study_seed: int
    output_shape: list[int]
    finite: bool
    max_abs_output: float

    def __post_init__(self) -> None:
        _require(self.finite, "parity.ort_self_check: the output was not finite")
        _require(
            math.isfinite(self.max_abs_output), "parity.ort_self_check.max_abs_output not finite"
        )


@dataclass(frozen=True)
class Parity:
    """The eager source network vs what will serve, on phantom studies (max |diff|, FP32).

    `max_abs_diff` is None exactly when `reference` is None: an ONNX source has no
    framework here to run it eagerly, and `status` says so.
    """

    reference: str | None  # what ran eagerly, e.g. "pytorch eager"; None for ONNX
    served_by: dict[str, str]  # runtime, precision, file: the `_net`'s runner
    study_seeds: list[int]
    samples: int
    max_abs_diff: float | None
    tolerance: float
    status: str
    ort_self_check: SelfCheck
    # INT8 runtimes only: their deviation from the FP32 network, as the build measures it
    runtime_deviation: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _require(
            (self.reference is None) == (self.max_abs_diff is None),
            "parity.max_abs_diff is required where a reference ran, and only there",
        )
        _require(self.tolerance > 0, "parity.tolerance must be positive")
        if self.max_abs_diff is not None:
            _require(
                math.isfinite(self.max_abs_diff) and 0 <= self.max_abs_diff <= self.tolerance,
                f"parity.max_abs_diff {self.max_abs_diff!r} is not within {self.tolerance:g}",
            )
            _require(bool(self.study_seeds) and self.samples > 0, "parity ran on no study")


@dataclass(frozen=True)
class ModelCard:
    task: str
    model: str  # the Triton model: <task>_net
    version: int  # its version folder
    source: Source
    importer: Importer
    intended_use: str  # the hospital's words, or "not given"
    training_data: str  # the hospital's words, or "not given"
    spec_differences: list[SpecDifference]
    import_adaptations: list[str]  # what the import changed to run the source as written
    parity: Parity
    acceptance: dict[str, Any] | None = None  # `abdoserve model validate` fills it
    schema: str = SCHEMA
    card_id: str = ""

    def __post_init__(self) -> None:
        _require(self.schema == SCHEMA, f"schema must be {SCHEMA!r}, got {self.schema!r}")
        _require(bool(self.task), "task is required")
        _require(self.model == f"{self.task}_net", f"model must be {self.task}_net")
        _require(
            isinstance(self.version, int) and not isinstance(self.version, bool),
            f"version must be an integer, got {self.version!r}",
        )
        _require(self.version >= 1, f"version must be 1 or more, got {self.version}")
        for name in ("intended_use", "training_data"):
            value = getattr(self, name)
            _require(
                isinstance(value, str) and bool(value.strip()),
                f"{name} must be text, or {NOT_GIVEN!r} where the hospital gave none",
            )
        eager = self.source.framework in EAGER_FRAMEWORKS
        _require(
            eager == (self.parity.reference is not None),
            f"{self.source.framework} sources need "
            + ("an eager parity figure" if eager else "parity n/a (no source framework)"),
        )
        if self.card_id:
            expected = content_id(self.to_json())
            _require(
                self.card_id == expected,
                f"card_id {self.card_id!r} does not match the content ({expected!r})",
            )

    def with_id(self) -> ModelCard:
        """This card with its id computed from its content."""
        return replace(self, card_id=content_id(replace(self, card_id="").to_json()))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> ModelCard:
        """A card from its JSON, checked; the id must be there and match."""
        data = _fields_of(cls, values, "card")
        data["source"] = Source(**_fields_of(Source, data["source"], "source"))
        data["importer"] = Importer(**_fields_of(Importer, data["importer"], "importer"))
        data["spec_differences"] = [
            SpecDifference(**_fields_of(SpecDifference, item, "spec_differences[]"))
            for item in _list(data["spec_differences"], "spec_differences")
        ]
        _list(data["import_adaptations"], "import_adaptations")
        parity = _fields_of(Parity, data["parity"], "parity")
        parity["ort_self_check"] = SelfCheck(
            **_fields_of(SelfCheck, parity["ort_self_check"], "parity.ort_self_check")
        )
        data["parity"] = Parity(**parity)
        _require(bool(data["card_id"]), "card_id is required")
        return cls(**data)


def content_id(card: Mapping[str, Any]) -> str:
    """A short hash of a card's JSON, without the id itself and the acceptance."""
    content = {key: value for key, value in card.items() if key not in _UNHASHED}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:CARD_ID_LENGTH]


def utc_now() -> str:
    return datetime.now(UTC).strftime(_UTC_TIME)


def write_card(card: ModelCard, version_folder: Path) -> Path:
    """`card.json` in the version folder, its id set; read back and checked once more."""
    final = card.with_id()
    path = version_folder / CARD_FILE
    text = json.dumps(final.to_json(), indent=2, sort_keys=True, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")
    read_card(path)
    return path


def read_card(path: Path) -> ModelCard:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelCardError(f"{path}: unreadable card: {error}") from error
    try:
        return ModelCard.from_json(values)
    except ModelCardError as error:
        raise ModelCardError(f"{path}: {error}") from error


def _fields_of(kind: type, values: Any, where: str) -> dict[str, Any]:
    _require(isinstance(values, Mapping), f"{where} must be an object")
    names = [item.name for item in fields(kind)]
    missing = [name for name in names if name not in values]
    unknown = sorted(set(values) - set(names))
    _require(not missing, f"{where}: missing field {', '.join(map(repr, missing))}")
    _require(not unknown, f"{where}: unknown field {', '.join(map(repr, unknown))}")
    return dict(values)


def _list(values: Any, where: str) -> list[Any]:
    _require(isinstance(values, list), f"{where} must be a list")
    return list(values)
