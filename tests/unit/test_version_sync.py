"""The supervisor's side of versions with a fake Triton model-repository API and real
config.pbtxt files (abdoserve.deploy.version_sync): a live change reaches the
repository, a repository change reaches the live server, unused versions go once a
routing has held, and a canary past its bound is rolled back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from abdoserve.deploy.rollback_watch import RollbackBounds, RollbackWatch
from abdoserve.deploy.version_sync import VersionSync, read_config, routing_on_disk
from abdoserve.deploy.versions import canary, pinned_versions, promote, routing_of, with_routing
from abdoserve.export.configs import Tuning, model_names, render_task, to_text
from abdoserve.export.repository import pin_versions
from abdoserve.preprocessing.tasks import get_task
from abdoserve.serving.routing import Routing
from abdoserve.serving.task_models import TaskModels
from tests.unit.test_rollback_watch import metrics

TASK = "bone_density_ct"
_, _, NET, POST = model_names(TASK)


class FakeControl:
    """Triton's live configs and repository index, changed by `load` as Triton would."""

    def __init__(self, repository: Path, models: tuple[str, ...] = (NET, POST)) -> None:
        self.configs = {
            name: json_format.MessageToDict(
                read_config(repository / name), preserving_proto_field_name=True
            )
            for name in models
        }
        self.loads: list[str] = []

    def config(self, model: str) -> dict[str, Any]:
        return json.loads(json.dumps(self.configs[model]))

    def load(self, model: str, config: dict[str, Any]) -> None:
        self.loads.append(model)
        self.configs[model] = json.loads(json.dumps(config))

    def index(self) -> list[dict[str, Any]]:
        return [
            {"name": name, "version": str(version), "state": "READY"}
            for name in self.configs
            for version in pinned_versions(self.configs[name])
        ]


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    configs = render_task(get_task(TASK), Tuning(), {})
    pin_versions(configs[NET], (1,))
    for name in (NET, POST):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.pbtxt").write_text(to_text(configs[name]))
    return tmp_path


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sync_of(control: FakeControl, repository: Path, clock: Clock, **options: Any) -> VersionSync:
    return VersionSync(
        control,  # type: ignore[arg-type]
        repository,
        clock=clock,
        monotonic=clock,
        prune_after_s=150.0,
        **options,
    )


def live_change(control: FakeControl, routing: Routing, versions: tuple[int, ...]) -> None:
    """What `abdoserve model ...` does to the server."""
    from abdoserve.deploy.versions import with_routing, with_versions

    control.load(NET, with_versions(control.config(NET), versions))
    control.load(POST, with_routing(control.config(POST), routing))


def test_a_fresh_build_is_in_step_and_nothing_is_loaded(repository: Path) -> None:
    control, clock = FakeControl(repository), Clock()
    sync = sync_of(control, repository, clock)
    assert sync.tasks() == [TaskModels(TASK, fused=False)]
    sync.check_once()
    clock.now += 1000
    sync.check_once()
    assert control.loads == []
    assert routing_on_disk(repository / POST) == Routing(production=1)


def test_a_live_change_is_written_into_the_repository(repository: Path) -> None:
    control, clock = FakeControl(repository), Clock()
    new = canary(Routing(production=1), 2, 25.0)
    live_change(control, new, (1, 2))
    sync_of(control, repository, clock).check_once()
    assert routing_on_disk(repository / POST) == new
    assert list(read_config(repository / NET).version_policy.specific.versions) == [1, 2]
    # The rest of each config is as the build wrote it.
    assert read_config(repository / POST).parameters["task"].string_value == TASK


def test_another_replicas_change_reaches_this_server(repository: Path) -> None:
    other, mine, clock = FakeControl(repository), FakeControl(repository), Clock()
    promoted = promote(Routing(production=1), 2, now=clock.now, window_s=600.0)
    live_change(other, promoted, (1, 2))
    sync_of(other, repository, clock).check_once()  # the replica the command reached
    sync_of(mine, repository, clock).check_once()
    assert routing_of(mine.configs[POST]) == promoted
    assert pinned_versions(mine.configs[NET]) == (1, 2)
    assert mine.loads == [NET, POST]  # the versions first, then the routing


def test_versions_nothing_routes_to_go_once_the_routing_has_held(repository: Path) -> None:
    control, clock = FakeControl(repository), Clock()
    promoted = promote(Routing(production=1), 2, now=clock.now, window_s=600.0)
    live_change(control, promoted, (1, 2))
    sync = sync_of(control, repository, clock)
    for step in (0.0, 100.0, 400.0):  # inside the rollback window: version 1 stays
        clock.now += step
        sync.check_once()
    assert pinned_versions(control.configs[NET]) == (1, 2)
    clock.now += 200.0  # the window closed 600 s after the promote
    sync.check_once()
    assert pinned_versions(control.configs[NET]) == (2,)
    assert list(read_config(repository / NET).version_policy.specific.versions) == [1, 2]


def test_a_canary_past_its_bound_goes_to_zero_and_is_counted(repository: Path) -> None:
    control, clock = FakeControl(repository), Clock()
    live_change(control, canary(Routing(production=1), 2, 50.0), (1, 2))
    texts = iter([metrics(), metrics(answers=30, agree=2, disagree=28)])
    rolled: list[tuple[str, int, str]] = []
    sync = sync_of(
        control,
        repository,
        clock,
        watch=RollbackWatch(RollbackBounds(window_s=60.0, min_studies=20)),
        metrics_text=lambda: next(texts),
        rolled_back=lambda task, version, breach: rolled.append((task, version, breach.bound)),
    )
    sync.check_once()
    clock.now += 20.0
    sync.check_once()
    after = routing_of(control.configs[POST])
    assert (after.mode, after.candidate, after.percent) == ("none", None, 0.0)
    assert after.reason.startswith("automatic rollback of version 2: disagreement")
    assert rolled == [(TASK, 2, "disagreement")]
    assert routing_on_disk(repository / POST) == after  # persisted like any change


def test_an_unwritable_repository_leaves_the_change_live(repository: Path) -> None:
    control, clock = FakeControl(repository), Clock()
    new = canary(Routing(production=1), 2, 10.0)
    live_change(control, new, (1, 2))
    # Where the staging file would go, a folder: writing fails, even as root.
    (repository / POST / ".config.pbtxt.versions").mkdir()
    sync = sync_of(control, repository, clock)
    sync.check_once()
    sync.check_once()
    assert sync.unwritable == {TASK}
    assert routing_of(control.configs[POST]) == new
    assert routing_on_disk(repository / POST) == Routing(production=1)


# --- the fused model: the routing and the versions in one model ---------------------------


@pytest.fixture
def fused_repository(tmp_path: Path) -> Path:
    """A fused build's `<task>` config (its policy pinned to its code's version 1), with
    version 2's folder beside it."""
    from tritonclient.grpc import model_config_pb2 as mc

    config = mc.ModelConfig(name=TASK, backend="python")
    config.parameters["task"].string_value = TASK
    config.version_policy.specific.versions.append(1)
    for version in (1, 2):
        (tmp_path / TASK / str(version)).mkdir(parents=True)
    (tmp_path / TASK / "config.pbtxt").write_text(to_text(config))
    return tmp_path


def test_a_fused_models_live_change_is_written_and_its_policy_stays_pinned(
    fused_repository: Path,
) -> None:
    control, clock = FakeControl(fused_repository, (TASK,)), Clock()
    sync = sync_of(control, fused_repository, clock)
    assert sync.tasks() == [TaskModels(TASK, fused=True)]
    new = canary(Routing(production=1), 2, 25.0)
    control.load(TASK, with_routing(control.config(TASK), new))
    sync.check_once()
    assert routing_on_disk(fused_repository / TASK) == new
    assert list(read_config(fused_repository / TASK).version_policy.specific.versions) == [1]
    clock.now += 1000.0  # nothing to prune: the model opens only what its routing needs
    sync.check_once()
    assert control.loads == [TASK]


def test_another_replicas_change_reaches_this_fused_model_in_one_reload(
    fused_repository: Path,
) -> None:
    other, mine = FakeControl(fused_repository, (TASK,)), FakeControl(fused_repository, (TASK,))
    clock = Clock()
    promoted = promote(Routing(production=1), 2, now=clock.now, window_s=600.0)
    other.load(TASK, with_routing(other.config(TASK), promoted))
    sync_of(other, fused_repository, clock).check_once()
    sync_of(mine, fused_repository, clock).check_once()
    assert routing_of(mine.configs[TASK]) == promoted
    assert mine.loads == [TASK]
    assert pinned_versions(mine.configs[TASK]) == (1,)


def test_a_fused_canary_past_its_bound_goes_to_zero(fused_repository: Path) -> None:
    control, clock = FakeControl(fused_repository, (TASK,)), Clock()
    control.load(TASK, with_routing(control.config(TASK), canary(Routing(production=1), 2, 50.0)))
    texts = iter([metrics(), metrics(answers=30, agree=2, disagree=28)])
    sync = sync_of(
        control,
        fused_repository,
        clock,
        watch=RollbackWatch(RollbackBounds(window_s=60.0, min_studies=20)),
        metrics_text=lambda: next(texts),
    )
    sync.check_once()
    clock.now += 20.0
    sync.check_once()
    after = routing_of(control.configs[TASK])
    assert (after.mode, after.candidate) == ("none", None)
    assert routing_on_disk(fused_repository / TASK) == after
