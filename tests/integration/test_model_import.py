"""An imported version does not serve (issue 20, item 1): Triton 2.51 on a one-task
ensemble repository (the fused shape pins its code the same way: test_versions_fused.py)
whose `_net` holds version 1 (the build) and version 2 (`model import`, other
weights) loads the pinned version 1 alone, at start and on the supervisor's reload, and
the answers are version 1's network to the last digit. Without the pin the same server
loads version 2 (Triton's default policy is the latest version) and answers with it."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from abdoserve.deploy.embedded import EmbeddedServer, ServerOptions, free_ports
from abdoserve.deploy.model_control import ADMIN_HEADER, ModelControl
from abdoserve.export.architectures import build_network
from abdoserve.export.fused import read_config
from abdoserve.export.model_card import CARD_FILE, read_card
from abdoserve.export.model_import import import_model
from abdoserve.export.phantom import build_study
from abdoserve.export.reference import TorchReference
from abdoserve.export.weights import initialise
from abdoserve.preprocessing.study import StudyPreparer
from abdoserve.preprocessing.tasks import get_task
from tests.integration.triton_calls import infer

TASK = "bone_density_ct"
NET = f"{TASK}_net"
SPEC = get_task(TASK)
SEED = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version 2's weights: the reference architecture trained 'elsewhere' (other seed)."""
    module = build_network(SPEC)
    initialise(module, 99)
    path = tmp_path_factory.mktemp("hospital") / "hospital.pt"
    torch.save(module.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Path:
    from abdoserve.export.repository import build_repository

    out = tmp_path_factory.mktemp("imported") / "model_repository"
    build_repository(out, (TASK,), pipeline="ensemble")  # the fused shape: test_versions_fused
    result = import_model(out, TASK, checkpoint, intended_use="the integration test")
    assert result.version == 2 and (out / NET / "2" / CARD_FILE).is_file()
    return out


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    log_file = tmp_path_factory.mktemp("triton") / "triton.log"
    options = ServerOptions(repository=repository, ports=free_ports(), log_file=log_file)
    with EmbeddedServer(options) as running:
        yield running


def net_versions(server: EmbeddedServer) -> dict[str, str]:
    """The `_net`'s versions in Triton's repository index, and the state of each."""
    request = urllib.request.Request(
        server.url("/v2/repository/index"),
        data=b"{}",
        method="POST",
        headers={ADMIN_HEADER: server.options.admin_key},
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        index: list[dict[str, Any]] = json.loads(reply.read())
    return {
        str(item.get("version")): str(item.get("state")) for item in index if item["name"] == NET
    }


def expected(checkpoint: Path | None) -> np.ndarray:
    """Per-sample values of version 1 (None: the build's weights) or of version 2."""
    study = build_study(TASK, seed=SEED)
    prepared = StudyPreparer(SPEC)(study.instances, study.clinical)
    return TorchReference(SPEC, checkpoint)(prepared.samples)


def answered(server: EmbeddedServer) -> tuple[np.ndarray, dict[str, Any]]:
    study = build_study(TASK, seed=SEED)
    with triton_grpc.InferenceServerClient(f"{server.options.host}:{server.ports.grpc}") as client:
        served = infer(client, TASK, study.instances, study.clinical)
    return served.scores, served.answer


def check_version_1_serves(server: EmbeddedServer, checkpoint: Path) -> None:
    with triton_grpc.InferenceServerClient(f"{server.options.host}:{server.ports.grpc}") as client:
        assert client.is_model_ready(NET, "1")
        assert not client.is_model_ready(NET, "2")
    assert net_versions(server).get("1") == "READY"
    assert net_versions(server).get("2") != "READY"
    scores, answer = answered(server)
    version_1, version_2 = expected(None), expected(checkpoint)
    assert np.max(np.abs(scores - version_1)) <= 1e-4
    assert np.max(np.abs(scores - version_2)) > 1e-2  # the two networks answer apart
    # The answer's `model.version` is the postprocess config's `model_version` parameter,
    # which says "1" whatever `_net` version ran: the values above are the evidence.
    assert answer["model"]["version"] == "1"
    assert answer["model"]["weights_source"] == "reference-untrained"


def test_the_pinned_config_serves_version_1_while_2_exists(
    repository: Path, server: EmbeddedServer, checkpoint: Path
) -> None:
    assert sorted(p.name for p in (repository / NET).iterdir()) == ["1", "2", "config.pbtxt"]
    assert list(read_config(repository / NET).version_policy.specific.versions) == [1]
    assert read_card(repository / NET / "2" / CARD_FILE).version == 2
    check_version_1_serves(server, checkpoint)


def test_version_2_cannot_be_asked_for_directly(server: EmbeddedServer) -> None:
    samples = triton_grpc.InferInput("SAMPLES", [1, 1, *SPEC.sample_shape], "FP32")
    samples.set_data_from_numpy(np.zeros((1, 1, *SPEC.sample_shape), np.float32))
    with (
        triton_grpc.InferenceServerClient(f"{server.options.host}:{server.ports.grpc}") as client,
        pytest.raises(InferenceServerException, match="version 2 is not found"),
    ):
        client.infer(NET, [samples], model_version="2")


def test_the_supervisors_reload_keeps_version_1(server: EmbeddedServer, checkpoint: Path) -> None:
    """What the supervisor does to a `_net` whose stub died: load it again with the config
    the server holds (the pin included), a new generation parameter forcing the reload."""
    control = ModelControl(server.url(""), server.options.admin_key)
    assert control.config(NET)["version_policy"] == {"specific": {"versions": [1]}}
    control.reload(NET)
    check_version_1_serves(server, checkpoint)
