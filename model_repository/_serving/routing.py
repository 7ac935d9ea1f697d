"""Which version of a task's network answers a study, and which runs beside it.

A task's routing is one small JSON document: the `routing` parameter of its
`<task>_postprocess` model, which calls `<task>_net` through BLS with the version it
picks (see docs/architecture.md, "Versions side by side"). `abdoserve model canary |
shadow | promote | rollback` set it through Triton's model-repository API; the
supervisor writes it into the repository's config.pbtxt, so that a restart serves it.

- **production** answers every study not in the canary.
- **canary**: studies whose bucket is below `percent` are answered by `candidate`.
  The bucket comes from the study's key (a digest of its SOP Instance UIDs), so a
  study sent again gets the same version, and raising the percentage only adds
  studies to the canary.
- **shadow**: studies whose bucket is below `percent` also go to `candidate` after
  the production answer is on its way; its answer is compared, never returned.
- In a canary, production runs beside each canary answer the same way, so that the
  disagreement that can trigger an automatic rollback is measured on every one.
- **previous** is the version a promote replaced: it stays loaded until the rollback
  window closes, so that `rollback` is one reload of this document.
- **validating**: `abdoserve model validate` sends the studies whose keys it lists (its
  labelled cohort), and only those, to the version it validates.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

ROUTING_PARAMETER = "routing"
# `<task>_net`'s parameter naming each imported version's model card ({"2": "3f9c..."}).
CARDS_PARAMETER = "version_cards"
VERDICTS = ("passed", "failed")
Mode = Literal["none", "canary", "shadow"]
MODES: tuple[Mode, ...] = ("none", "canary", "shadow")
BUCKETS = 10_000  # a study's bucket, out of these: percentages to 0.01 %


class RoutingError(ValueError):
    """A routing document that cannot be served: its message names the field."""


@dataclass(frozen=True)
class Routing:
    production: int
    candidate: int | None = None
    mode: Mode = "none"
    percent: float = 0.0
    previous: int | None = None
    previous_until: float = 0.0  # epoch seconds: the rollback window's end
    generation: int = 0  # raised by every change; the newest wins where copies differ
    reason: str = ""  # why the last change was made (an automatic rollback says so)
    validating: int | None = None  # the version `model validate` sends its cohort to
    validation_keys: tuple[str, ...] = ()  # the cohort's study keys
    # Each validated version's last verdict, which `promote` reads: (version, verdict)
    acceptance: tuple[tuple[int, str], ...] = ()

    def __post_init__(self) -> None:
        _check_version("production", self.production)
        for name in ("candidate", "previous", "validating"):
            value = getattr(self, name)
            if value is not None:
                _check_version(name, value)
        if self.mode not in MODES:
            raise RoutingError(f"routing 'mode' must be one of {', '.join(MODES)}")
        if not 0.0 <= self.percent <= 100.0:
            raise RoutingError("routing 'percent' must be within [0, 100]")
        if self.mode != "none" and self.candidate is None:
            raise RoutingError(f"routing mode {self.mode!r} needs a 'candidate'")
        if self.candidate is not None and self.candidate == self.production:
            raise RoutingError("routing 'candidate' must differ from 'production'")
        if len(self.reason) > 500:
            raise RoutingError("routing 'reason' must be at most 500 characters")
        if self.validation_keys and self.validating is None:
            raise RoutingError("routing 'validation_keys' needs 'validating'")
        _check_acceptance(self.acceptance)

    def verdict(self, version: int) -> str | None:
        """The version's last validation verdict, if it was validated."""
        return dict(self.acceptance).get(version)

    # -- what a study gets ------------------------------------------------------------

    def answering(self, key: str) -> int:
        """The version whose answer the study gets."""
        if self.validating is not None and key in self.validation_keys:
            return self.validating
        if self.mode == "canary" and self._sampled(key):
            assert self.candidate is not None
            return self.candidate
        return self.production

    def companion(self, key: str) -> int | None:
        """The version that runs beside the answer for comparison, if any: the candidate
        in shadow, production beside a canary answer."""
        if self.candidate is None or not self._sampled(key) or key in self.validation_keys:
            return None
        if self.mode == "shadow":
            return self.candidate
        if self.mode == "canary":
            return self.production
        return None

    def _sampled(self, key: str) -> bool:
        return bucket(key) < self.percent * (BUCKETS / 100)

    # -- what must be loaded ----------------------------------------------------------

    def versions(self, now: float) -> tuple[int, ...]:
        """The `<task>_net` versions this routing needs loaded at `now`."""
        needed = {self.production}
        if self.candidate is not None:
            needed.add(self.candidate)
        if self.previous is not None and now < self.previous_until:
            needed.add(self.previous)
        if self.validating is not None:
            needed.add(self.validating)
        return tuple(sorted(needed))

    def state_of(self, version: int, now: float) -> str:
        """serving | canary | shadow | candidate | previous | retired, as `model list` shows."""
        if version == self.production:
            return "serving"
        if version == self.candidate:
            return self.mode if self.mode != "none" else "candidate"
        if version == self.previous and now < self.previous_until:
            return "previous"
        if version == self.validating:
            return "validating"
        return "retired"

    # -- the document -----------------------------------------------------------------

    def to_json(self) -> str:
        document = asdict(self)
        document["acceptance"] = {str(version): verdict for version, verdict in self.acceptance}
        return json.dumps(document, sort_keys=True)

    def changed(self, **fields: Any) -> Routing:
        """This routing with `fields` changed and the generation raised."""
        return replace(self, generation=self.generation + 1, **fields)

    @classmethod
    def from_json(cls, text: str) -> Routing:
        try:
            value = json.loads(text)
        except ValueError as error:
            raise RoutingError(f"routing is not JSON: {error}") from error
        if not isinstance(value, dict):
            raise RoutingError("routing must be a JSON object")
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise RoutingError(f"routing has unknown fields: {', '.join(sorted(unknown))}")
        if "production" not in value:
            raise RoutingError("routing needs 'production'")
        if isinstance(value.get("validation_keys"), list):
            value["validation_keys"] = tuple(value["validation_keys"])
        accepted = value.get("acceptance")
        if isinstance(accepted, dict):
            try:
                value["acceptance"] = tuple(
                    sorted((int(version), verdict) for version, verdict in accepted.items())
                )
            except ValueError as error:
                raise RoutingError("routing 'acceptance' keys are version numbers") from error
        try:
            return cls(**value)
        except TypeError as error:
            raise RoutingError(f"routing: {error}") from error


def served_routing(parameters: Mapping[str, str]) -> Routing:
    """What the postprocess model serves: its `routing` parameter (the model commands set
    it through a reload; the supervisor writes it into config.pbtxt, so that a restart
    serves it too), else the built version alone."""
    text = parameters.get(ROUTING_PARAMETER)
    if text:
        return Routing.from_json(text)
    return Routing(production=int(parameters.get("model_version", "1")))


def bucket(key: str) -> int:
    """The study's bucket in [0, BUCKETS): uniform over keys, fixed per key."""
    digest = hashlib.sha256(b"abdoserve-routing:" + key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def _check_acceptance(acceptance: tuple[tuple[int, str], ...]) -> None:
    for version, verdict in acceptance:
        _check_version("acceptance", version)
        if verdict not in VERDICTS:
            raise RoutingError(f"routing 'acceptance' verdicts are {' or '.join(VERDICTS)}")


def _check_version(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RoutingError(f"routing {name!r} must be a version number >= 1, got {value!r}")
