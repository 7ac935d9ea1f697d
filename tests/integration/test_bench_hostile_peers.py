"""`bench hostile`'s hostile peers against real processes: a guarded server (nginx in front
of Triton, a 6 s call deadline to keep it short) and a gateway with no server behind it
(nothing here reaches its spool). Then the whole command, once, end to end."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from abdoserve.deploy.embedded import ServerOptions, free_port, free_ports
from abdoserve.deploy.guard import GuardLimits
from abdoserve.deploy.supervisor import Supervisor, SupervisorOptions
from abdoserve.loadtests.bench import hostile, hostile_peers
from abdoserve.loadtests.bench.hostile_peers import GatewayCase, GuardCase
from tests.integration.gateway_process import AE_TITLE, GatewayProcess

TASKS = ("bone_density_ct", "liver_fibrosis_ct", "esophageal_cancer_ct")  # the requests'
MIB = 1024 * 1024
REQUEST_TIMEOUT_S = 6
LIMITS = GuardLimits(257 * MIB, request_timeout_s=REQUEST_TIMEOUT_S)
RULES = Path(__file__).resolve().parents[2] / "deploy" / "gateway" / "rules.example.yaml"
MODALITY = "MODALITY"
ASSOCIATION_S = 10.0  # the gateway's ConnectionLimits.association_s
PER_CALLER = 4  # its --max-associations-per-caller default
PDU_BOMB_RSS_MIB = 64  # before the cap, the 4 GiB header grew the gateway by ~2 GB
WAIT_S = 30.0


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from abdoserve.export.repository import build_repository

    out = tmp_path_factory.mktemp("hostile-peers") / "model_repository"
    build_repository(out, TASKS)
    return out


@pytest.fixture(scope="module")
def guarded(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    folder = tmp_path_factory.mktemp("guarded")
    options = ServerOptions(repository=repository, ports=free_ports(), log_file=folder / "t.log")
    supervisor = Supervisor(options, SupervisorOptions(health_port=None, guard=LIMITS)).start()
    yield supervisor
    supervisor.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    nowhere = f"127.0.0.1:{free_port()}"  # no server: no study gets that far
    folder = tmp_path_factory.mktemp("gateway")
    extra = ["--allow-caller", MODALITY]
    with GatewayProcess(folder, RULES, nowhere, [], extra=extra) as process:
        yield process


def server_pid(supervisor: Supervisor) -> int:
    assert supervisor.server is not None and supervisor.server.process is not None
    return supervisor.server.process.pid


def gateway_case(gateway: GatewayProcess) -> GatewayCase:
    assert gateway.process is not None
    return GatewayCase("127.0.0.1", gateway.port, gateway.process.pid, MODALITY, AE_TITLE, WAIT_S)


def test_the_guard_is_found_beside_tritonserver(guarded: Supervisor) -> None:
    assert guarded.guard is not None and guarded.guard.process is not None
    master = guarded.guard.process.pid
    assert hostile_peers.guard_master(server_pid(guarded)) == master
    workers = hostile_peers.children_named(master, "nginx")
    assert len(workers) == 1  # worker_processes 1
    assert hostile_peers.WorkersRss(master)() > 0


def test_slow_streams_past_the_share_are_refused_and_the_rest_ended_at_the_deadline(
    guarded: Supervisor,
) -> None:
    assert guarded.guard is not None and guarded.guard.process is not None
    master = guarded.guard.process.pid
    assert hostile_peers.guard_master(server_pid(guarded)) == master  # what the bench finds
    case = GuardCase(
        guarded.public_host, guarded.public_ports.grpc, master, honest_calls=3, wait_s=WAIT_S
    )
    result = hostile_peers.slow_streams(case)
    share = LIMITS.max_inflight_per_client
    refused = result.seconds(hostile_peers.GRPC_RESOURCE_EXHAUSTED)
    expired = result.seconds(hostile_peers.GRPC_DEADLINE_EXCEEDED)
    assert len(refused) == 31 - share, result.ends
    assert max(refused) < 1.0, refused  # at once, from the headers
    assert len(expired) == share and result.still_open == 0, result.ends
    # ended at the guard's deadline, not later by the trickle's own pace
    assert all(REQUEST_TIMEOUT_S - 0.5 <= s < REQUEST_TIMEOUT_S + 5 for s in expired), expired
    assert result.answered == 3
    assert result.rss_rise_mib < 64
    assert result.row().markdown().endswith(" | yes: 3/3 bone_density_ct calls from 127.0.0.1 |")


def test_a_pdu_claiming_4_gib_is_closed_before_its_body_is_taken(
    gateway: GatewayProcess,
) -> None:
    result = hostile_peers.pdu_bomb(gateway_case(gateway))
    assert result.closed_s is not None and result.closed_s < 5.0, result
    # what went out fits in the loopback socket buffers (a few MiB), never the 1 GiB
    assert result.sent < 16 * MIB, result
    assert result.rss_rise_mib < PDU_BOMB_RSS_MIB, result
    assert result.echoes[1] >= 2 and result.echoes[0] == result.echoes[1], result
    refused = "abdoserve_gateway_connections_refused_total"
    assert gateway.metric(refused, reason="pdu_too_large") >= 1


def test_slow_associators_hold_their_share_while_the_modality_is_answered(
    gateway: GatewayProcess,
) -> None:
    result = hostile_peers.slow_associators(gateway_case(gateway))
    closed = sorted(s for s in result.closed_s if s is not None)
    assert len(closed) == 8, result.closed_s
    at_once, held = closed[: 8 - PER_CALLER], closed[8 - PER_CALLER :]
    assert max(at_once) < 0.5, closed  # accepted and refused: no wait on a full backlog
    assert all(ASSOCIATION_S - 0.5 <= s < ASSOCIATION_S + 3 for s in held), closed
    assert all(sent < result.request_bytes for sent in result.sent), result.sent
    succeeded, attempted = result.echoes
    assert attempted >= 4 and succeeded == attempted, result.echoes  # every 2 s over ~10 s
    assert result.rss_rise_mib < 64, result


def table(lines: list[str], header: str) -> list[list[str]]:
    """The rows of the markdown table under `header`, as lists of cells."""
    start = lines.index(header)
    assert set(lines[start + 1]) <= set("|-")
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def test_the_command_prints_both_tables(guarded: Supervisor, gateway: GatewayProcess) -> None:
    assert gateway.process is not None
    command = [
        sys.executable,
        "-m",
        "abdoserve.deploy.cli",
        "bench",
        "hostile",
        "--host",
        f"{guarded.public_host}:{guarded.public_ports.grpc}",
        "--server-pid",
        str(server_pid(guarded)),
        "--honest-calls",
        "2",
        "--peer-wait-s",
        str(WAIT_S),
        "--gateway",
        f"127.0.0.1:{gateway.port}",
        "--gateway-pid",
        str(gateway.process.pid),
        "--calling-ae",
        MODALITY,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    requests = table(lines, hostile.REQUEST_HEADER.splitlines()[0])
    assert len(requests) >= 6 and all(len(row) == 6 for row in requests), requests
    # (not "stubs unchanged": the supervisor's memory trim may reload a model between rows)
    assert all(row[2].startswith("INVALID_ARGUMENT: ") for row in requests), requests
    peers = table(lines, hostile_peers.PEER_HEADER.splitlines()[0])
    assert [row[0] for row in peers] == [
        "31 slow gRPC streams from one address (guard)",
        "a DICOM PDU claiming 4 GiB (gateway)",
        "8 slow associators (gateway)",
    ]
    share = LIMITS.max_inflight_per_client
    assert peers[0][2].startswith(f"{31 - share} refused at once (RESOURCE_EXHAUSTED); ")
    assert f"{share} held, {share} of them ended DEADLINE_EXCEEDED" in peers[0][2]
    assert peers[1][2].startswith("closed by the gateway; ")
    assert peers[2][2].startswith(f"{8 - PER_CALLER} closed at once, {PER_CALLER} held then ")
    for row in peers:
        assert len(row) == 6 and row[4].endswith(" MiB"), row
        assert row[5].startswith("yes: "), row


def test_a_frozen_server_is_reported_killed_and_answering_again(guarded: Supervisor) -> None:
    """Last in this module: it restarts the server (the supervisor starts a new one)."""
    from abdoserve.export.phantom import build_study
    from abdoserve.loadtests.bench.frozen_server import CALL_DEADLINE_S, frozen_server

    url = f"{guarded.public_host}:{guarded.public_ports.grpc}"
    study = build_study(TASKS[0], seed=11)
    result = frozen_server(url, server_pid(guarded), study, TASKS[0], wait_s=120.0)
    assert result.ended_with == "UNAVAILABLE", result
    assert result.ended_s < CALL_DEADLINE_S / 2, result  # at once, not at its deadline
    assert result.killed and result.answered_again_s is not None, result
    row = result.row().markdown()
    assert "the frozen server killed" in row and "yes: 1/1" in row, row
