"""Versions of a task's network on a running server: what serves, and changing it.

The state lives in Triton, changed through its model-repository API behind the admin
key, so that it works wherever the commands reach a server (one host, `--replicas`
behind the guard, a pod):
- which versions of `<task>_net` are loaded: its config's `version_policy`;
- which answers: the `routing` parameter of `<task>_postprocess`
  (abdoserve.serving.routing).
A fused `<task>` holds both: its routing parameter, and the versions it opens in its
own process (abdoserve.serving.task_models); a change there is one reload of it.

A change loads the versions both routings need first and waits until they are ready,
then reloads the postprocess model with the new routing. Triton swaps a reloaded model
when its new instances are ready and lets the old ones finish what they hold, so no
request fails. Versions no longer needed are unloaded later by the supervisor
(abdoserve.deploy.version_sync), once the old instances have drained; it also writes
each change into the repository's configs, so that a restart serves the same, and
carries it to the other replicas.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from abdoserve.deploy.model_control import ADMIN_HEADER, GRPC_HEADER_PREFIX
from abdoserve.serving.routing import CARDS_PARAMETER, ROUTING_PARAMETER, Routing, RoutingError
from abdoserve.serving.task_models import TaskModels

ROLLBACK_WINDOW_S = 3600.0  # how long a promote keeps the version it replaced loaded
IN_PROCESS = "IN PROCESS"  # `model list`'s state of a version a fused model runs itself


class VersionError(RuntimeError):
    """A change that cannot be made, or a server that refused it; the message says which."""


# -- the document's transitions ------------------------------------------------------------


def shadow(current: Routing, version: int, percent: float) -> Routing:
    _check_candidate(current, version)
    return current.changed(
        candidate=version, mode="shadow", percent=percent, reason=f"shadow {percent:g} %"
    )


def canary(current: Routing, version: int, percent: float) -> Routing:
    _check_candidate(current, version)
    return current.changed(
        candidate=version, mode="canary", percent=percent, reason=f"canary {percent:g} %"
    )


def promote(
    current: Routing, version: int, now: float, window_s: float, forced: str = ""
) -> Routing:
    if version == current.production:
        raise VersionError(f"version {version} already serves")
    reason = f"promoted, replacing version {current.production}"
    return current.changed(
        production=version,
        candidate=None,
        mode="none",
        percent=0.0,
        previous=current.production,
        previous_until=now + window_s,
        reason=f"{reason}; forced: {forced}" if forced else reason,
    )


def check_accepted(state: TaskVersions, version: int, forced: str) -> None:
    """A version is promoted once its last validation passed the task's thresholds, or
    when the operator forces it with a reason, which the routing then records."""
    verdict = state.routing.verdict(version)
    if verdict == "passed" or forced:
        return
    found = "was never validated" if verdict is None else f"failed its validation ({verdict})"
    raise VersionError(
        f"{state.task} version {version} {found}: run `abdoserve model validate`, or "
        "promote with --force --reason TEXT"
    )


def rollback(current: Routing, now: float) -> Routing:
    """End an experiment (shadow, canary); else undo the last promote within its window."""
    if current.candidate is not None:
        return current.changed(
            candidate=None, mode="none", percent=0.0, reason=f"rolled back {current.mode}"
        )
    if current.previous is not None and now < current.previous_until:
        return current.changed(
            production=current.previous,
            previous=None,
            previous_until=0.0,
            reason=f"rolled back to version {current.previous}",
        )
    if current.previous is not None:
        raise VersionError(
            f"nothing to roll back: version {current.previous}'s rollback window has closed "
            f"(promote it to serve it again)"
        )
    raise VersionError("nothing to roll back: no candidate and no earlier version")


def _check_candidate(current: Routing, version: int) -> None:
    if version == current.production:
        raise VersionError(f"version {version} is the one that serves: name another")
    if current.candidate is not None and current.candidate != version:
        raise VersionError(
            f"version {current.candidate} is already in {current.mode}: roll it back first"
        )


# -- the server side -----------------------------------------------------------------------


@dataclass(frozen=True)
class TaskVersions:
    task: str
    routing: Routing
    loaded: Mapping[int, str]  # version: Triton's state (READY, UNAVAILABLE, ...)
    cards: Mapping[int, str]  # version: its model card id, where it has one
    models: TaskModels | None = None  # where they live; None: the ensemble's

    def versions(self) -> list[int]:
        return sorted(set(self.loaded) | set(self.cards) | {self.routing.production})


def routing_of(config: Mapping[str, Any]) -> Routing:
    """The routing a postprocess config serves (see served_routing: a config without
    the parameter serves its built version)."""
    parameters = config.get("parameters", {})
    text = parameters.get(ROUTING_PARAMETER, {}).get("string_value", "")
    if text:
        return Routing.from_json(text)
    built = parameters.get("model_version", {}).get("string_value", "1")
    return Routing(production=int(built))


def pinned_versions(config: Mapping[str, Any]) -> tuple[int, ...]:
    specific = config.get("version_policy", {}).get("specific", {})
    return tuple(sorted(int(version) for version in specific.get("versions", [])))


def _copy(config: Mapping[str, Any]) -> dict[str, Any]:
    copied: dict[str, Any] = json.loads(json.dumps(config))
    return copied


def with_routing(config: Mapping[str, Any], routing: Routing) -> dict[str, Any]:
    changed = _copy(config)
    changed.setdefault("parameters", {})[ROUTING_PARAMETER] = {"string_value": routing.to_json()}
    return changed


def with_versions(config: Mapping[str, Any], versions: tuple[int, ...]) -> dict[str, Any]:
    changed = _copy(config)
    changed["version_policy"] = {"specific": {"versions": [str(v) for v in sorted(versions)]}}
    return changed


def cards_of(config: Mapping[str, Any]) -> dict[int, str]:
    return per_version(config, CARDS_PARAMETER)


def per_version(config: Mapping[str, Any], name: str) -> dict[int, str]:
    """A `_net` parameter holding a JSON object keyed by version; {} if absent or bad."""
    text = config.get("parameters", {}).get(name, {}).get("string_value", "")
    try:
        values = json.loads(text) if text else {}
    except ValueError:
        return {}
    if not isinstance(values, dict):
        return {}
    return {int(version): str(value) for version, value in values.items() if version.isdigit()}


class VersionControl:
    """The model commands' side: reads and changes one server's versions over gRPC."""

    def __init__(
        self,
        client: Any,  # tritonclient.grpc.InferenceServerClient
        admin_key: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.headers = {GRPC_HEADER_PREFIX + ADMIN_HEADER: admin_key}
        self.clock = clock

    def config(self, model: str) -> dict[str, Any]:
        reply = self.client.get_model_config(model, headers=self.headers, as_json=True)
        config: dict[str, Any] = reply["config"]
        return config

    def state(self, task: str) -> TaskVersions:
        models = self.models(task)
        try:
            routing = routing_of(self.config(models.router))
        except RoutingError as error:
            raise VersionError(f"{task}: the server's routing cannot be read: {error}") from error
        cards = cards_of(self.config(models.versions))
        if models.fused:
            # Triton loads the fused model's code (version 1); the versions it routes to
            # run in its process, opened when it loaded.
            ready = self.client.is_model_ready(task, headers=self.headers)
            state = IN_PROCESS if ready else "UNAVAILABLE"
            loaded = {version: state for version in routing.versions(self.clock())}
        else:
            loaded = self.loaded(models.versions)
        return TaskVersions(task, routing, loaded, cards, models)

    def models(self, task: str) -> TaskModels:
        """The task's shape on this server: `<task>_net` (the ensemble) or a fused `<task>`."""
        from tritonclient.utils import InferenceServerException

        try:
            self.config(f"{task}_net")
            return TaskModels(task, fused=False)
        except InferenceServerException as missing:
            try:
                config = self.config(task)
            except InferenceServerException as error:
                raise VersionError(
                    f"{task}: the server has no such task ({missing.message()})"
                ) from error
        if config.get("backend") != "python" or config.get("platform") == "ensemble":
            raise VersionError(f"{task}: the server has no {task}_net and no fused {task}")
        return TaskModels(task, fused=True)

    def loaded(self, model: str) -> dict[int, str]:
        index = self.client.get_model_repository_index(headers=self.headers, as_json=True)
        return {
            int(entry["version"]): str(entry.get("state", ""))
            for entry in index.get("models", [])
            if entry.get("name") == model and str(entry.get("version", "")).isdigit()
        }

    def apply(self, task: str, change: Callable[[Routing, float], Routing]) -> Routing:
        """`change` the task's routing on this server; returns the new routing."""
        now = self.clock()
        current = self.state(task)
        new = change(current.routing, now)
        if current.models is not None and current.models.fused:
            self._reload_fused(task, new)
            return new
        net = f"{task}_net"
        needed = tuple(sorted(set(current.routing.versions(now)) | set(new.versions(now))))
        net_config = self.config(net)
        if set(needed) - set(pinned_versions(net_config)) or not self._all_ready(net, needed):
            self._load(net, with_versions(net_config, needed))  # returns once loaded
            missing = self._not_ready(net, needed)
            if missing:
                self._load(net, net_config)  # what served before, as it was
                raise VersionError(f"{net} could not load version {missing}")
        post = f"{task}_postprocess"
        self._load(post, with_routing(self.config(post), new))
        return new

    def _reload_fused(self, task: str, new: Routing) -> None:
        """One reload: the new instance opens the versions `new` needs, or fails to load
        (a version not in the repository), and the old config is loaded back."""
        before = self.config(task)
        try:
            self._load(task, with_routing(before, new))
        except VersionError:
            self._load(task, before)  # what served before, as it was
            raise
        if not self.client.is_model_ready(task, headers=self.headers):
            self._load(task, before)
            raise VersionError(f"{task} did not come back ready with the new routing")

    def _load(self, model: str, config: Mapping[str, Any]) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            self.client.load_model(model, headers=self.headers, config=json.dumps(config))
        except InferenceServerException as error:
            raise VersionError(f"the server refused to load {model}: {error.message()}") from error

    def _all_ready(self, model: str, versions: tuple[int, ...]) -> bool:
        return not self._not_ready(model, versions)

    def _not_ready(self, model: str, versions: tuple[int, ...]) -> str:
        """The versions that are not READY, each with Triton's reason ("" if none)."""
        entries = {
            int(entry["version"]): entry
            for entry in self.client.get_model_repository_index(
                headers=self.headers, as_json=True
            ).get("models", [])
            if entry.get("name") == model and str(entry.get("version", "")).isdigit()
        }
        problems = []
        for version in versions:
            entry = entries.get(version)
            if entry is None:
                problems.append(f"{version} (not in the repository)")
            elif entry.get("state") != "READY":
                problems.append(f"{version} ({entry.get('state')}: {entry.get('reason', '')})")
        return ", ".join(problems)
