"""The supervisor's side of versions: the live routing kept in the repository, carried to
the other replicas, and versions unloaded once nothing routes to them.

The model commands change a server's versions through Triton's model-repository API
(abdoserve.deploy.versions); a `--replicas` balancer sends each command to one replica.
Every supervisor compares, per task, the routing its server serves with the one in the
repository's `<task>_postprocess/config.pbtxt` (all replicas share the repository):
- **live newer** (a command reached this server, or its own automatic rollback): it
  writes the routing and the `_net`'s version policy into the configs, so that a
  restart of the server, or of `serve`, comes back to it;
- **repository newer**, or as new but different (another replica's change): it loads
  the versions that routing needs, then the routing, on this server;
- **the same**: once a routing has held for `prune_after_s` (the replaced instances
  have drained), versions it no longer needs are unloaded (a closed rollback window's
  version, an ended canary's), and model cards imported since are read in.

A repository that cannot be written (a read-only volume in a pod) leaves the change on
the live server only; that is logged once per task.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from abdoserve.deploy.model_control import ModelControl
from abdoserve.deploy.rollback_watch import Breach, RollbackWatch, Samples, parse_metrics
from abdoserve.deploy.versions import pinned_versions, with_routing, with_versions
from abdoserve.serving.routing import CARDS_PARAMETER, ROUTING_PARAMETER, Routing
from abdoserve.serving.task_models import TaskModels, routed_tasks

# The `_net` parameter `model import` writes into the repository: read into the live
# config when the net is loaded anyway (never a load of its own: each costs a swap).
RECORDS = (CARDS_PARAMETER,)

log = logging.getLogger(__name__)
# Longer than the guard's call deadline (120 s): a request that started on the replaced
# postprocess instance has ended by then, so no call routes to an unloaded version.
PRUNE_AFTER_S = 150.0
CONFIG_FILE = "config.pbtxt"


RolledBack = Callable[[str, int, Breach], None]  # task, version, why: counted and logged


class VersionSync:
    def __init__(
        self,
        control: ModelControl,
        repository: Path,
        *,
        watch: RollbackWatch | None = None,
        metrics_text: Callable[[], str] | None = None,
        rolled_back: RolledBack | None = None,
        prune_after_s: float = PRUNE_AFTER_S,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.control = control
        self.repository = repository
        self.watch = watch
        self.metrics_text = metrics_text
        self.rolled_back = rolled_back
        self.prune_after_s = prune_after_s
        self.clock = clock
        self.monotonic = monotonic
        self.held_since: dict[str, tuple[int, float]] = {}  # task: (generation, since)
        self.unwritable: set[str] = set()

    def tasks(self) -> list[TaskModels]:
        """Tasks that route between versions: the ensemble's or the fused model's."""
        return routed_tasks(self.repository)

    def check_once(self, samples: Samples | None = None) -> None:
        """`samples`: the server's /metrics, parsed (read here with `metrics_text` if not
        given), for the canary's watch."""
        if samples is None and self.watch is not None and self.metrics_text is not None:
            samples = parse_metrics(self.metrics_text())
        for models in self.tasks():
            self.sync(models, samples)

    def sync(self, models: TaskModels, samples: Samples | None = None) -> None:
        task = models.task
        live_config = self.control.config(models.router)
        live = routing_in_config(live_config)
        if samples is not None and self.watch is not None:
            breach = self.watch.breach(task, live, samples, self.monotonic())
            if breach is not None:
                live = self.roll_back(models, live, live_config, breach)
        on_disk = routing_on_disk(self.repository / models.router)
        now = self.clock()
        if live.generation > on_disk.generation:
            self.persist(models, live, now)
        elif on_disk != live:
            log.warning(
                "%s: adopting routing generation %d from the repository (%s)",
                task,
                on_disk.generation,
                on_disk.reason or "no reason given",
            )
            self.adopt(models, on_disk, live_config, now)
            return
        if not models.fused:  # a fused model opens only what its routing needs
            self.settle(task, live, now)

    def roll_back(
        self, models: TaskModels, routing: Routing, live_config: Mapping[str, Any], breach: Breach
    ) -> Routing:
        """The canary to 0 % on this server; persisted and carried like any change."""
        assert routing.candidate is not None
        rolled = routing.changed(
            candidate=None,
            mode="none",
            percent=0.0,
            reason=f"automatic rollback of version {routing.candidate}: {breach.detail}",
        )
        log.error("%s: %s", models.task, rolled.reason)
        self.control.load(models.router, with_routing(live_config, rolled))
        if self.rolled_back is not None:
            self.rolled_back(models.task, routing.candidate, breach)
        return rolled

    def persist(self, models: TaskModels, routing: Routing, now: float) -> None:
        task = models.task
        try:
            edit_config(
                self.repository / models.router,
                lambda config: config.parameters[ROUTING_PARAMETER].__setattr__(
                    "string_value", routing.to_json()
                ),
            )
            if not models.fused:  # the fused model's policy stays pinned to its code
                edit_config(
                    self.repository / models.versions,
                    lambda config: pin(config, routing.versions(now)),
                )
        except OSError as error:
            if task not in self.unwritable:
                log.warning(
                    "%s: routing generation %d serves here only: the repository cannot be "
                    "written (%s)",
                    task,
                    routing.generation,
                    error,
                )
                self.unwritable.add(task)
            return
        log.info("%s: routing generation %d written to the repository", task, routing.generation)

    def adopt(
        self, models: TaskModels, routing: Routing, live_config: Mapping[str, Any], now: float
    ) -> None:
        if models.fused:  # one reload: the new instance opens the versions it routes to
            config = self._with_records(models.router, with_routing(live_config, routing))
            self.control.load(models.router, config)
            return
        task = models.task
        net = f"{task}_net"
        net_config = self.control.config(net)
        needed = tuple(sorted(set(routing.versions(now)) | set(pinned_versions(net_config))))
        if not self._ready(net, needed):  # returns once loaded
            self.control.load(net, self._with_records(net, with_versions(net_config, needed)))
        self.control.load(f"{task}_postprocess", with_routing(live_config, routing))

    def settle(self, task: str, routing: Routing, now: float) -> None:
        """Versions nothing routes to are unloaded once the routing has held
        `prune_after_s`, and cards imported since are read in with them."""
        net = f"{task}_net"
        live_net = self.control.config(net)
        pinned = pinned_versions(live_net)
        needed = routing.versions(now)
        held = self.held_since.get(task)
        if held is None or held[0] != routing.generation:
            self.held_since[task] = (routing.generation, self.monotonic())
            held = self.held_since[task]
        if self.monotonic() - held[1] < self.prune_after_s or set(pinned) == set(needed):
            return
        log.info("%s: loading %s versions %s (unused ones unloaded)", task, net, needed)
        self.control.load(net, self._with_records(net, with_versions(live_net, needed)))

    def _with_records(self, net: str, config: dict[str, Any]) -> dict[str, Any]:
        """`config` with the cards the repository holds now (imports since the start)."""
        parameters = config.setdefault("parameters", {})
        for name, text in records_on_disk(self.repository / net).items():
            parameters[name] = {"string_value": text}
        return config

    def _ready(self, model: str, versions: tuple[int, ...]) -> bool:
        states = {
            int(entry["version"]): entry.get("state")
            for entry in self.control.index()
            if entry.get("name") == model and str(entry.get("version", "")).isdigit()
        }
        return all(states.get(version) == "READY" for version in versions)


def routing_in_config(config: Mapping[str, Any]) -> Routing:
    from abdoserve.deploy.versions import routing_of

    return routing_of(config)


def read_config(folder: Path) -> mc.ModelConfig:
    return text_format.Parse((folder / CONFIG_FILE).read_text(), mc.ModelConfig())


def routing_on_disk(folder: Path) -> Routing:
    parameters = read_config(folder).parameters
    if ROUTING_PARAMETER in parameters and parameters[ROUTING_PARAMETER].string_value:
        return Routing.from_json(parameters[ROUTING_PARAMETER].string_value)
    built = parameters["model_version"].string_value if "model_version" in parameters else "1"
    return Routing(production=int(built))


def records_on_disk(folder: Path) -> dict[str, str]:
    """The `_net` config's cards and verdicts in the repository (absent ones left out)."""
    parameters = read_config(folder).parameters
    return {name: parameters[name].string_value for name in RECORDS if name in parameters}


def pin(config: mc.ModelConfig, versions: tuple[int, ...]) -> None:
    pinned = config.version_policy.specific.versions
    del pinned[:]
    pinned.extend(sorted(versions))


def edit_config(folder: Path, change: Callable[[mc.ModelConfig], None]) -> None:
    """Read, change and write back a model's config.pbtxt (an atomic rename)."""
    config = read_config(folder)
    change(config)
    staging = folder / f".{CONFIG_FILE}.versions"
    staging.write_text(text_format.MessageToString(config))
    os.replace(staging, folder / CONFIG_FILE)
