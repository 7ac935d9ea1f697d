"""`abdoserve bench serving` in quick mode: against the session's server and with its own.

Checks the shape of what it prints and writes, never the timings: performance is a
benchmark's ratio, never a timed test. Each run measures in interleaved rounds; every
round's rows are checked, and each ratio's median against its rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil
import pytest

from abdoserve.deploy.embedded import EmbeddedServer
from abdoserve.export.configs import Tuning
from abdoserve.loadtests.bench import serving as bench_serving

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Longest first: "served gRPC" is a prefix of "served gRPC, BYTES".
ROW_LABELS = (
    "in-process onnxruntime",
    "in-process pytorch",
    "served gRPC, BYTES",
    "served gRPC",
    "served shared memory",
    "fused gRPC",
    "fused shared memory",
    "PyTriton, one callable",
)
FORM_LABELS = {
    "grpc_bytes": "served gRPC, BYTES",
    "served": "served gRPC",
    "shared_memory": "served shared memory",
    "fused": "fused gRPC",
    "fused_shared_memory": "fused shared memory",
    "pytriton": "PyTriton, one callable",
}
TRANSPORTS = {"fused": "served", "fused_shared_memory": "shared_memory"}
COLUMNS = ("pipeline", "conc", "studies/s", "min-max", "images/s", "p50 ms", "p95 ms", "p99 ms")


def run_bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    bench_serving.add_arguments(parser)
    return bench_serving.run(parser.parse_args(argv))


def outputs(tmp_path: Path) -> list[str]:
    return ["--json", str(tmp_path / "bench.json"), "--plot", str(tmp_path / "bench.png")]


def table_rows(printed: str, task: str) -> list[list[str]]:
    """The rows of `task`'s table, split into label, concurrency and numbers."""
    lines = printed.splitlines()
    start = next(
        i for i, line in enumerate(lines) if line.startswith(f"{task}:") and "rounds (" in line
    )
    assert lines[start + 1].split() == [word for column in COLUMNS for word in column.split()]
    rows = []
    for line in lines[start + 2 :]:
        label = next((label for label in ROW_LABELS if line.startswith(label)), None)
        if label is None:
            break
        rows.append([label, *line[len(label) :].split()])
    return rows


def peer_ran(printed: str, task: str) -> bool:
    """Whether the PyTriton peer started (up to three tries). PyTriton 0.7's proxy model
    can find its handshake socket refused at start-up under load: the bench then says so,
    naming each try's log, and goes on without the peer's rows."""
    if f"pytriton skipped for {task}: the peer did not start" not in printed:
        return True
    assert printed.count("pytriton: attempt") == 3 and ".log ends:" in printed
    return False


def check_measurement(row: dict[str, Any], pipeline: str, concurrency: int, requests: int) -> None:
    assert row["pipeline"] == pipeline and row["concurrency"] == concurrency
    assert row["requests"] == requests == len(row["latencies_ms"])
    for key in ("wall_seconds", "studies_per_second", "images_per_second", "p50_ms", "p99_ms"):
        assert row[key] > 0, key
    assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    assert all(latency > 0 for latency in row["latencies_ms"])


def check_files(tmp_path: Path) -> dict[str, Any]:
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG_MAGIC
    document: dict[str, Any] = json.loads((tmp_path / "bench.json").read_text())
    machine = document["machine"]
    assert machine["cpu_count"] > 0 and machine["cpu_model"] and machine["platform"]
    assert set(document["tuning"]) == set(asdict(Tuning()))
    return document


def check_spread(figure: dict[str, Any], rounds: int) -> float:
    """A ratio over the rounds: its median, between its min and max, of `rounds` values."""
    assert len(figure["rounds"]) == rounds
    assert figure["min"] == min(figure["rounds"]) and figure["max"] == max(figure["rounds"])
    assert figure["min"] <= figure["median"] <= figure["max"]
    assert figure["median"] == pytest.approx(statistics.median(figure["rounds"]))
    return float(figure["median"])


def check_task(
    document: dict[str, Any], task: str, requests: int, forms: tuple[str, ...], rounds: int
) -> None:
    result = document["tasks"][task]
    assert document["settings"]["rounds"] == rounds == len(result["rounds"])
    for each in result["rounds"]:
        check_measurement(each["onnxruntime"], "onnxruntime", 1, requests)
        check_measurement(each["pytorch"], "pytorch", 1, requests)
        for form in forms:
            for row, level in zip(each[form], (1, 4), strict=True):
                check_measurement(row, form, level, requests)
    ratios = result["ratios"]
    throughput = check_spread(ratios["served_over_in_process_throughput"], rounds)
    per_round = [each["ratios"]["served_over_in_process_throughput"] for each in result["rounds"]]
    assert list(ratios["served_over_in_process_throughput"]["rounds"]) == per_round
    assert throughput > 0
    assert check_spread(ratios["pytorch_over_onnxruntime_time"], rounds) > 0
    assert ratios["throughput_target_met"] is (throughput >= 0.95)
    assert isinstance(ratios["latency_target_met"], bool)


def check_breakdown(
    result: dict[str, Any],
    levels: tuple[int, ...],
    forms: tuple[str, ...],
    *,
    fused_server: bool = False,
) -> None:
    """Where a study's time went, per form and level: every part measured, and the
    composing models' queue and compute within the ensemble's own time (a fused model,
    or a server whose tasks are fused, has one stage)."""
    parts = [part for each in result["rounds"] for part in each["breakdown"]]
    assert [(part["form"], part["concurrency"]) for part in parts] == [
        (form, level) for _ in result["rounds"] for form in forms for level in levels
    ]
    for part in parts:
        for key in ("round_trip_ms", "encode_ms", "server_ms", "server_cpu_ms", "client_cpu_ms"):
            assert part[key] > 0, key
        stages = (
            {"pipeline"}
            if fused_server or part["form"].startswith("fused")
            else {"preprocess", "net", "postprocess"}
        )
        assert set(part["compute_ms"]) == stages
        assert all(value > 0 for value in part["compute_ms"].values())
        inside = sum(part["compute_ms"].values()) + sum(part["queue_ms"].values())
        # Per-request means of separately updated counters (a batch's compute counts for
        # each of its requests; a few requests): close to, not exactly within, the ensemble's.
        assert inside <= 1.15 * part["server_ms"] + 1.0
        assert part["transfer_ms"] == pytest.approx(part["round_trip_ms"] - part["server_ms"])


def test_quick_against_the_running_server(
    server: EmbeddedServer,
    grpc_url: str,
    ensemble_repository: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`serve`'s default (fused) server; in process and PyTriton read the ensemble
    build's `_net`, the same export."""
    key_file = tmp_path / "admin.key"
    key_file.write_text(server.options.admin_key)
    assert server.process is not None
    argv = ["--quick", "--url", grpc_url, "--repository", str(ensemble_repository)]
    argv += ["--without-scores"]  # the lever: every response checked to lack SCORES
    argv += ["--admin-key-file", str(key_file), "--server-pid", str(server.process.pid)]
    assert run_bench(argv + outputs(tmp_path)) == 0  # the default: three rounds
    printed = capsys.readouterr().out
    assert [line for line in printed.splitlines() if ": round " in line][:4] == [
        "liver_fibrosis_ct: round 1 of 3, in process",
        "liver_fibrosis_ct: round 1 of 3, served",
        "liver_fibrosis_ct: round 2 of 3, in process",
        "liver_fibrosis_ct: round 2 of 3, served",
    ]
    rows = table_rows(printed, "liver_fibrosis_ct")
    peer = peer_ran(printed, "liver_fibrosis_ct")
    assert [(row[0], row[1]) for row in rows] == [
        ("in-process onnxruntime", "1"),
        ("in-process pytorch", "1"),
        ("served gRPC", "1"),
        ("served gRPC", "4"),
        ("served gRPC, BYTES", "1"),
        ("served gRPC, BYTES", "4"),
    ] + [("PyTriton, one callable", level) for level in ("1", "4") if peer]
    assert all(len(row) == len(COLUMNS) and float(row[2]) > 0 for row in rows)
    for row in rows:  # the median rate within its rounds' min-max
        low, high = (float(value) for value in row[3].split("-"))
        assert low - 0.05 <= float(row[2]) <= high + 0.05
    assert "served / in-process throughput:" in printed and "served p50 at c=1:" in printed
    # The session's server has no shared region, no null model and no fused pipeline:
    # those parts are skipped.
    assert "shared_memory skipped: no shared region" in printed
    assert "fused skipped: the server has no model fused_liver_fibrosis_ct" in printed
    document = check_files(tmp_path)
    assert document["settings"]["url"] == grpc_url
    assert document["settings"]["scores"] is False
    assert document["tuning"] == asdict(Tuning())  # read back from the server's configs
    forms = ("grpc_bytes", "served")
    compared = (*forms, "pytriton") if peer else forms
    check_task(document, "liver_fibrosis_ct", requests=10, forms=compared, rounds=3)
    check_breakdown(document["tasks"]["liver_fibrosis_ct"], (1, 4), forms, fused_server=True)
    ratios = document["tasks"]["liver_fibrosis_ct"]["ratios"]
    if peer:
        assert set(ratios["served_over_pytriton"]) == {"1", "4"}
        assert all(check_spread(value, 3) > 0 for value in ratios["served_over_pytriton"].values())
    assert document["tasks"]["liver_fibrosis_ct"]["split"] == []
    assert "liver_fibrosis_ct: where a study's time goes (ms per study" in printed
    assert document["images_sweep"] is None


def check_split(result: dict[str, Any], forms: tuple[str, ...], requests: int) -> None:
    """The null model ran in every form, and each form's parts add up to its served time
    in every round; the task's split gives each figure's median over the rounds."""
    for transport in {TRANSPORTS.get(form, form) for form in forms}:
        probe = result["transport_probe"][transport]
        check_measurement(probe, "transport_probe", 1, requests)
        # Read (the server is local), but it may be 0: /proc counts CPU in clock ticks
        # (10 ms), and a few null requests can fall within one.
        assert probe["form"] == transport and probe["server_cpu_ms"] >= 0
    assert len(result["transport_probe"]) == len({TRANSPORTS.get(f, f) for f in forms})
    assert [split["form"] for split in result["split"]] == list(forms)
    for split in result["split"]:
        check_spread(split["c1"]["else_over_work"], len(result["rounds"]))
    for split in (split for each in result["rounds"] for split in each["split"]):
        c1, saturation = split["c1"], split["saturation"]
        parts = c1["work_ms"] + c1["transport_ms"] + c1["else_ms"]
        assert parts == pytest.approx(c1["served_ms"])
        assert c1["else_over_work"] == pytest.approx(c1["else_ms"] / c1["work_ms"])
        assert saturation["concurrency"] in (1, 4)
        assert saturation["server_cpu_ms"] > 0 and saturation["transport_cpu_ms"] >= 0
        ratio = saturation["server_cpu_ms"] / (
            saturation["work_cpu_ms"] + saturation["transport_cpu_ms"]
        )
        assert saturation["server_cpu_over_work_and_transport"] == pytest.approx(ratio)
        assert isinstance(saturation["cpu_target_met"], bool)


def tritonservers() -> set[int]:
    """Our tritonserver processes (the session's server among them, if started)."""
    return {
        child.pid
        for child in psutil.Process().children(recursive=True)
        if child.name() == "tritonserver"
    }


def test_quick_with_its_own_server_and_an_image_sweep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = "esophageal_cancer_ct"
    argv = ["--quick", "--tasks", task, "--images", "1,2", "--requests", "6", "--rounds", "2"]
    argv += ["--repository", str(tmp_path / "repository")]
    argv += ["--log-file", str(tmp_path / "triton.log"), "--net-threads", "1"]
    before = tritonservers()
    assert run_bench(argv + outputs(tmp_path)) == 0
    assert tritonservers() == before  # its own server stopped at the end
    printed = capsys.readouterr().out
    forms = ("grpc_bytes", "served", "shared_memory", "fused", "fused_shared_memory")
    peer = peer_ran(printed, task)
    shown = ("served", "grpc_bytes", "shared_memory", "fused", "fused_shared_memory")
    shown += ("pytriton",) if peer else ()
    assert [row[0] for row in table_rows(printed, task)[2:]] == [
        FORM_LABELS[form] for form in shown for _ in (1, 4)
    ]
    assert "cost vs images per study: esophageal_cancer_ct" in printed
    assert f"{task}: work, transport and everything else" in printed
    document = check_files(tmp_path)
    assert document["tuning"]["net_intra_op_threads"] == 1
    compared = (*forms, "pytriton") if peer else forms
    check_task(document, task, requests=6, forms=compared, rounds=2)
    check_breakdown(document["tasks"][task], (1, 4), forms)  # its own server: key, pid known
    if peer:
        assert set(document["tasks"][task]["ratios"]["fused_over_pytriton"]) == {"1", "4"}
    check_split(document["tasks"][task], forms, requests=6)
    points = document["images_sweep"]["points"]
    assert [point["images"] for point in points] == [1, 2]
    for point in points:
        check_measurement(point["onnxruntime"], "onnxruntime", 1, 6)
        assert point["onnxruntime"]["images_per_study"] == point["images"]
        for row, level in zip(point["served"], (1, 16), strict=True):
            check_measurement(row, "served", level, 6)


def test_ctrl_c_stops_its_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = tritonservers()
    during: set[int] = set()

    def interrupted(plan: object, target: object, pools: object) -> None:
        during.update(tritonservers() - before)
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_serving, "measure_all", interrupted)
    argv = ["--quick", "--tasks", "liver_mass_ct", "--repository", str(tmp_path / "repository")]
    assert run_bench([*argv, "--log-file", str(tmp_path / "triton.log")]) == 130
    assert len(during) == 1 and tritonservers() == before
    assert "interrupted" in capsys.readouterr().out
