"""`abdoserve bench serving`'s parts without a server: the timing loops, the forms and
their requests, the server's setup files and options, the breakdown and split arithmetic,
the report's tables and files, and the plan. Hand-made studies and measurements; the
numbers each figure must come to are worked out in the comments."""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path
from typing import Any, cast

import pytest
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2

from abdoserve.export.configs import Tuning
from abdoserve.loadtests.bench import serving
from abdoserve.loadtests.bench.breakdown import (
    COMPOSING,
    Breakdown,
    ModelCounters,
    Probe,
    Snapshot,
    Split,
    breakdown,
    execute_ms,
    format_breakdown,
    format_split,
    median_split,
    parse_executed,
    snapshot,
    splits,
    stage_models,
)
from abdoserve.loadtests.bench.in_process import InProcess, build_record, time_in_process
from abdoserve.loadtests.bench.report import (
    SweepPoint,
    TaskResult,
    TaskRounds,
    document,
    format_sweep,
    pooled_percentile,
    task_blocks,
    write_plot,
)
from abdoserve.loadtests.bench.served_target import (
    Target,
    describe,
    install_probe,
    observer,
    probe_config,
    tuning_of,
)
from abdoserve.loadtests.bench.transports import (
    FORMS,
    Placement,
    Served,
    inline_request,
    model_of,
    outputs_of,
    placed_request,
    slot_bytes,
    transport_of,
)
from abdoserve.loadtests.bench.workload import (
    Measurement,
    Study,
    images_per_study,
    study_pool,
    time_concurrent,
    time_sequential,
)
from abdoserve_client.shared_memory import SharedMemoryRegion

TASK = "liver_fibrosis_ct"


def measurement(
    pipeline: str,
    concurrency: int,
    latencies: tuple[float, ...],
    wall_seconds: float,
    *,
    cpu_seconds: float = 0.0,
    images: float = 2.0,
) -> Measurement:
    return Measurement(pipeline, concurrency, images, wall_seconds, cpu_seconds, latencies)


# --- workload: the figures of a row and the two timing loops -----------------------------


def test_a_measurement_derives_its_figures_from_its_latencies() -> None:
    row = measurement("served", 4, (10.0, 20.0, 30.0, 40.0), 0.5, cpu_seconds=0.2, images=3.0)
    assert row.requests == 4
    assert row.studies_per_second == 8.0  # 4 requests in 0.5 s
    assert row.images_per_second == 24.0  # 3 images each
    assert row.mean_ms == 25.0
    assert row.cpu_ms_per_study == pytest.approx(50.0)  # 200 ms over 4
    assert row.percentile_ms(50) == 25.0
    summary = row.summary()
    assert list(summary)[:8] == [
        "pipeline",
        "concurrency",
        "requests",
        "images_per_study",
        "wall_seconds",
        "this_process_cpu_ms_per_study",
        "studies_per_second",
        "images_per_second",
    ]
    assert summary["this_process_cpu_ms_per_study"] == pytest.approx(50.0)
    assert (summary["p50_ms"], summary["latencies_ms"]) == (25.0, [10.0, 20.0, 30.0, 40.0])


def study(sizes: tuple[int, ...]) -> Study:
    return Study(tuple(bytes(size) for size in sizes), {"age": 60})


def test_images_per_study_is_the_pool_mean() -> None:
    assert images_per_study([study((1, 1)), study((1, 1, 1, 1))]) == 3.0


def test_the_sweep_pool_has_the_asked_images_per_study() -> None:
    pool = study_pool("esophageal_cancer_ct", 2, images=3)
    assert [len(each.instances) for each in pool] == [3, 3]
    assert pool[0].instances != pool[1].instances  # seeds 1 and 2


def test_sequential_timing_warms_up_then_times_each_request() -> None:
    calls: list[int] = []
    row = time_sequential("onnxruntime", calls.append, [study((1, 1))], requests=3, warmup=2)
    assert calls == [0, 1, 0, 1, 2]
    assert (row.pipeline, row.concurrency, row.requests, row.images_per_study) == (
        "onnxruntime",
        1,
        3,
        2.0,
    )


def test_concurrent_timing_sends_each_timed_request_once() -> None:
    calls: list[int] = []
    lock = threading.Lock()

    def record(number: int) -> None:
        with lock:
            calls.append(number)

    row = time_concurrent(lambda: record, [study((1,))], 7, 3, warmup=1, pipeline="grpc_bytes")
    assert (row.pipeline, row.concurrency, row.requests) == ("grpc_bytes", 3, 7)
    # each thread's warm-up request is numbered by the thread (0, 1, 2), then 0..6 timed
    assert sorted(calls) == sorted([0, 1, 2, *range(7)])


def test_concurrent_timing_raises_a_callers_error() -> None:
    def broken() -> Any:
        raise ConnectionError("no server")

    with pytest.raises(ConnectionError, match="no server"):
        time_concurrent(broken, [study((1,))], 5, 2, warmup=1)


# --- transports: forms, requests and the callers' slots -----------------------------------


def test_each_form_has_its_transport_and_model() -> None:
    assert [transport_of(form) for form in FORMS] == [
        "grpc_bytes",
        "served",
        "shared_memory",
        "served",
        "shared_memory",
        "served",
    ]
    assert [model_of(form, TASK) for form in FORMS] == [
        TASK,
        TASK,
        TASK,
        f"fused_{TASK}",
        f"fused_{TASK}",
        f"pytriton_{TASK}",
    ]
    assert outputs_of("transport_probe") == ("BYTES_SEEN",)
    assert outputs_of(TASK) == ("SCORES", "STUDY", "ANSWER")
    assert outputs_of(TASK, scores=False) == ("STUDY", "ANSWER")


def test_a_slot_holds_the_largest_study_rounded_up_to_64_kib() -> None:
    assert slot_bytes([[study((40_000, 30_000))], [study((10,))]]) == 131_072
    assert slot_bytes([[study((65_536,))]]) == 65_536


def decoded(request: bytes) -> Any:
    return service_pb2.ModelInferRequest.FromString(request)


def test_an_inline_request_carries_the_study_as_its_form_says() -> None:
    one = study((3, 5))
    as_bytes = decoded(inline_request(TASK, one, "grpc_bytes", ("STUDY",)))
    assert [tensor.name for tensor in as_bytes.inputs] == ["DICOM", "CLINICAL"]
    assert list(as_bytes.inputs[0].shape) == [1, 2]
    packed = decoded(inline_request(f"fused_{TASK}", one, "fused", ("STUDY", "ANSWER")))
    assert packed.model_name == f"fused_{TASK}"
    assert [tensor.name for tensor in packed.inputs] == [
        "DICOM_PACKED",
        "DICOM_OFFSETS",
        "CLINICAL",
    ]
    assert list(packed.inputs[0].shape) == [1, 8]  # 3 + 5 bytes back to back
    assert len(packed.raw_input_contents[0]) == 8
    assert [output.name for output in packed.outputs] == ["STUDY", "ANSWER"]


class FakeRegion:
    """Records the caller's writes; as many slots as asked."""

    def __init__(self, slots: int, slot_bytes: int = 1024) -> None:
        self.name = "bench-region"
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.writes: list[tuple[int, int]] = []

    def write(self, offset: int, instances: tuple[bytes, ...]) -> int:
        total = sum(len(instance) for instance in instances)
        self.writes.append((offset, total))
        return total


def test_a_placed_request_refers_to_the_callers_slot() -> None:
    region = FakeRegion(slots=2)
    where = Placement(cast(SharedMemoryRegion, region), offset=2048)
    request = decoded(placed_request(TASK, study((3, 5)), where, ("STUDY",)))
    assert region.writes == [(2048, 8)]
    packed = request.inputs[0]
    assert packed.name == "DICOM_PACKED"
    assert packed.parameters["shared_memory_region"].string_param == "bench-region"
    assert packed.parameters["shared_memory_byte_size"].int64_param == 8
    assert packed.parameters["shared_memory_offset"].int64_param == 2048
    assert len(request.raw_input_contents) == 2  # the offsets and CLINICAL only


def test_each_caller_cycles_the_pool_and_owns_one_slot() -> None:
    pool = [study((3,)), study((4,)), study((5,))]
    served = Served("localhost:1", TASK, pool, "grpc_bytes")
    maker = served.request_maker(0)
    assert [maker(number) for number in (0, 4)] == [served.requests[0], served.requests[1]]
    region = FakeRegion(slots=2)
    served = Served("localhost:1", TASK, pool, "shared_memory", region=cast(Any, region))
    served.request_maker(1)(5)  # study 5 % 3 = 2, in slot 1
    assert region.writes == [(1024, 5)]
    with pytest.raises(ValueError, match="2 slots"):
        served.request_maker(2)
    with pytest.raises(ValueError, match="needs a shared-memory region"):
        Served("localhost:1", TASK, pool, "fused_shared_memory")


# --- served_target: the probe's files, the options, the tuning read back ------------------


def test_the_probe_takes_the_preprocess_inputs_and_answers_one_number(tmp_path: Path) -> None:
    config = probe_config(instances=3)
    assert (config.name, config.backend, config.instance_group[0].count) == (
        "transport_probe",
        "python",
        3,
    )
    assert [(tensor.name, tensor.optional) for tensor in config.input] == [
        ("DICOM", True),
        ("DICOM_PACKED", True),
        ("DICOM_OFFSETS", True),
        ("CLINICAL", True),
    ]
    assert [tensor.name for tensor in config.output] == ["BYTES_SEEN"]
    install_probe(tmp_path, 3)
    written = tmp_path / "transport_probe" / "config.pbtxt"
    assert "count: 3" in written.read_text()
    assert (tmp_path / "transport_probe" / "1" / "model.py").stat().st_size > 0
    install_probe(tmp_path, 5)  # already there: left as it is
    assert "count: 3" in written.read_text()


def options(**given: Any) -> argparse.Namespace:
    names = ("admin_key_file", "shm_key_file", "server_pid", "shared_region", "metrics_url")
    return argparse.Namespace(**{name: given.get(name) for name in names})


def test_the_options_say_what_may_be_observed_of_a_running_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ABDOSERVE_ADMIN_KEY", raising=False)
    monkeypatch.setenv("ABDOSERVE_SHM_KEY", "shm-secret")
    key_file = tmp_path / "admin.key"
    key_file.write_text(" admin-secret\n")
    seen = observer(options(admin_key_file=key_file, server_pid=42, shared_region="region"))
    assert seen.admin_headers == {"triton-grpc-protocol-abdoserve-admin-key": "admin-secret"}
    assert (seen.server_pid, seen.region_name, seen.shm_key) == (42, "region", "shm-secret")
    key_file.write_text("\n")  # an empty key is no key
    assert observer(options(admin_key_file=key_file)).admin_headers is None


def test_a_running_servers_tuning_is_read_from_its_configs() -> None:
    pre, net, post = mc.ModelConfig(), mc.ModelConfig(), mc.ModelConfig()
    pre.instance_group.add(count=3)
    pre.dynamic_batching.max_queue_delay_microseconds = 500
    net.instance_group.add(count=2)
    net.instance_group.add(count=2)
    net.parameters["intra_op_threads"].string_value = "4"
    tuning = tuning_of(pre, net, post)  # post has no group: one instance
    assert tuning == Tuning(
        preprocess_instances=3,
        net_instances=4,
        postprocess_instances=1,
        net_intra_op_threads=4,
        max_queue_delay_us=500,
        max_samples_per_run=Tuning().max_samples_per_run,
    )
    assert describe(Tuning()).startswith("preprocess_instances=2, net_instances=2, ")


# --- breakdown: counters, the parts of a level, the split ---------------------------------


def test_counters_subtract_and_divide_per_request() -> None:
    delta = ModelCounters(6, 60_000_000, 6_000_000, 16_000_000).minus(
        ModelCounters(2, 20_000_000, 2_000_000, 4_000_000)
    )
    assert delta == ModelCounters(4, 40_000_000, 4_000_000, 12_000_000)
    assert delta.per_request_ms(delta.compute_ns) == 3.0
    assert ModelCounters(0, 0, 0, 0).per_request_ms(5) == 0.0


def test_a_study_passes_three_stages_or_the_fused_one() -> None:
    assert stage_models(TASK, TASK) == {
        "preprocess": f"{TASK}_preprocess",
        "net": f"{TASK}_net",
        "postprocess": f"{TASK}_postprocess",
    }
    assert stage_models(TASK, f"fused_{TASK}") == {"pipeline": f"fused_{TASK}"}


METRICS = """\
# HELP abdoserve_execute_duration_seconds Time inside execute.
# TYPE abdoserve_execute_duration_seconds histogram
abdoserve_execute_duration_seconds_bucket{model="a_preprocess",le="0.1"} 3.0
abdoserve_execute_duration_seconds_bucket{model="a_preprocess",le="+Inf"} 4.0
abdoserve_execute_duration_seconds_count{model="a_preprocess"} 4.0
abdoserve_execute_duration_seconds_sum{model="a_preprocess"} 0.5
# HELP other_total Something else.
# TYPE other_total counter
other_total{model="a_net"} 9.0
"""


def test_the_time_inside_execute_is_read_from_metrics_text() -> None:
    assert parse_executed(METRICS) == {"a_preprocess": (4.0, 0.5)}
    before = Snapshot({}, None, {"a": (2.0, 0.004)})
    after = Snapshot({}, None, {"a": (6.0, 0.012), "b": (3.0, 0.009)})
    assert execute_ms(before, after, "a") == pytest.approx(2.0)  # 8 ms over 4 calls
    assert execute_ms(before, after, "b") == pytest.approx(3.0)  # none before
    assert execute_ms(after, after, "a") is None  # no call between
    assert execute_ms(before, after, "c") is None


def counters(requests: int, *milliseconds: float) -> ModelCounters:
    """A model's counters: requests, then request, queue and compute time in ms."""
    request_ns, queue_ns, compute_ns = (int(ms * 1e6) for ms in milliseconds)
    return ModelCounters(requests, request_ns, queue_ns, compute_ns)


def ensemble_snapshots() -> tuple[Snapshot, Snapshot]:
    """Four studies between the two: 40 ms in the ensemble, 0.2 s of server CPU."""
    before = Snapshot(
        {
            TASK: counters(2, 20, 0, 0),
            f"{TASK}_preprocess": counters(2, 0, 2, 4),
            f"{TASK}_net": counters(2, 0, 0, 10),
            f"{TASK}_postprocess": counters(2, 0, 0, 2),
        },
        1.0,
        {f"{TASK}_preprocess": (2.0, 0.004)},
    )
    after = Snapshot(
        {
            TASK: counters(6, 60, 0, 0),
            f"{TASK}_preprocess": counters(6, 0, 6, 16),
            f"{TASK}_net": counters(6, 0, 4, 30),
            # 7 ms per study: its own 1 and the net's 1 + 5, called inside it (BLS)
            f"{TASK}_postprocess": counters(6, 0, 0, 30),
        },
        1.2,
        {f"{TASK}_preprocess": (6.0, 0.012), f"{TASK}_net": (3.0, 0.01)},
    )
    return before, after


def test_a_levels_breakdown_divides_the_deltas_per_study() -> None:
    before, after = ensemble_snapshots()
    row = measurement("served", 4, (11.0, 13.0, 12.0, 12.0), 0.5, cpu_seconds=0.1)
    part = breakdown(TASK, TASK, before, after, row=row, encode_ms=0.5)
    assert (part.form, part.concurrency, part.round_trip_ms) == ("served", 4, 12.0)
    assert part.server_ms == pytest.approx(10.0)  # 40 ms over 4 studies
    assert part.transfer_ms == pytest.approx(2.0)  # 12 - 10
    assert part.queue_ms == pytest.approx({"preprocess": 1.0, "net": 1.0, "postprocess": 0.0})
    assert part.compute_ms == pytest.approx({"preprocess": 3.0, "net": 5.0, "postprocess": 1.0})
    assert part.server_cpu_ms == pytest.approx(50.0)  # 0.2 s over 4
    assert part.client_cpu_ms == pytest.approx(25.0)  # 0.1 s over 4
    assert part.execute_ms == pytest.approx({"preprocess": 2.0, "net": 1e3 * 0.01 / 3})
    line = format_breakdown(TASK, [part], in_process_cpu_ms=12.0).splitlines()[2]
    cells = [cell.split() for cell in line.split("|")]
    assert cells[0] == ["served", "4", "12.0", "0.5", "2.0", "10.0"]
    assert cells[1] == ["1.0/", "3.0", "1.0/", "5.0", "0.0/", "1.0"]
    assert cells[2] == ["50.0", "25.0", "12.0"]
    assert cells[3] == ["in", "execute:", "preprocess", "2.0,", "net", "3.3"]


def test_a_fused_breakdown_has_one_stage_shown_first() -> None:
    fused = f"fused_{TASK}"
    before = Snapshot({fused: counters(0, 0, 1, 2)}, None)
    after = Snapshot({fused: counters(2, 30, 3, 22)}, None)
    row = measurement("fused", 1, (16.0, 16.0), 0.1)
    part = breakdown(TASK, fused, before, after, row=row, encode_ms=0.0)
    assert (part.queue_ms, part.compute_ms) == ({"pipeline": 1.0}, {"pipeline": 10.0})
    assert part.server_cpu_ms is None and part.execute_ms == {}
    line = format_breakdown(TASK, [part], in_process_cpu_ms=1.0).splitlines()[2]
    assert line.split("|")[1].split() == ["1.0/", "10.0", "-", "-"]
    assert line.split("|")[2].split()[0] == "-"  # no server CPU


def test_no_snapshot_without_the_admin_key() -> None:
    assert snapshot(Target("localhost:1", Tuning()), TASK, TASK) is None


def part(form: str, level: int, server_cpu_ms: float | None) -> Breakdown:
    """A level of the ensemble with only its server CPU per study known."""
    stages = dict.fromkeys(COMPOSING, 0.0)
    return Breakdown(level, 0.0, 0.0, 0.0, 0.0, stages, stages, server_cpu_ms, 0.0, form)


def split_round(server_cpu_ms: float | None = 14.7, local_ms: float = 15.0) -> TaskResult:
    """In process 15 ms a study (20/s, 12 ms CPU); served 20 ms at c=1 and 40/s at c=4;
    the null model 3 ms and 2 ms of server CPU."""
    local = measurement("onnxruntime", 1, (local_ms, local_ms), 0.1, cpu_seconds=0.024)
    served = (
        measurement("served", 1, (20.0, 20.0), 0.1),
        measurement("served", 4, (40.0, 40.0), 0.05),
    )
    others = {
        "grpc_bytes": (measurement("grpc_bytes", 1, (25.0, 25.0), 0.1),),  # no probe: no split
        "fused": (measurement("fused", 1, (18.0, 18.0), 0.1),),
        "pytriton": (measurement("pytriton", 1, (30.0, 30.0), 0.1),),
    }
    probe = Probe("served", measurement("transport_probe", 1, (3.0, 3.0), 0.1), 2.0)
    return TaskResult(
        TASK,
        4,
        local,
        measurement("pytorch", 1, (30.0, 30.0), 0.2),
        served,
        (part("served", 4, server_cpu_ms), part("served", 1, 99.0)),
        others,
        {"served": probe},
    )


def test_the_split_takes_work_and_transport_from_the_served_time() -> None:
    served, fused = splits(split_round())  # in the order of FORMS; the peer never
    assert (served.form, fused.form) == ("served", "fused")
    assert (served.served_ms, served.work_ms, served.transport_ms) == (20.0, 15.0, 3.0)
    assert served.else_ms == 2.0
    assert served.else_fraction == pytest.approx(2 / 15)
    assert (served.saturation_concurrency, served.throughput_ratio) == (4, 2.0)  # 40 / 20
    assert served.work_cpu_ms == pytest.approx(12.0)
    assert served.cpu_ratio == pytest.approx(14.7 / 14.0)  # / (12 + 2)
    assert served.else_cpu_fraction == pytest.approx(0.7 / 12)
    assert fused.served_ms == 18.0 and fused.server_cpu_ms is None  # no statistics read
    assert fused.cpu_ratio is None and fused.else_cpu_fraction is None
    summary = served.summary()
    assert summary["c1"]["else_target_met"] is False  # 13 % of the work > 10 %
    assert summary["saturation"]["cpu_target_met"] is True  # 1.05 <= 1.10
    assert summary["saturation"]["else_cpu_target_met"] is True  # 5.8 % <= 10 %
    assert fused.summary()["saturation"]["cpu_target_met"] is None


def test_the_split_over_rounds_is_each_figures_median() -> None:
    rounds = [splits(split_round(cpu, local))[0] for cpu, local in ((14.0, 15.0), (None, 16.0))]
    rounds.append(splits(split_round(16.0, 17.0))[0])
    median = median_split(rounds)
    assert median.work_ms == 16.0
    assert median.served_ms == 20.0
    assert median.server_cpu_ms is None  # one round could not read it
    assert median.saturation_concurrency == 4
    line = format_split(TaskRounds(TASK, (split_round(),))).splitlines()[2].split()
    assert line[:8] == ["served", "20.0", "15.0", "3.0", "2.0", "(", "13.3%)", "|"]
    assert line[8:] == ["4", "2.00", "14.7", "14.0", "1.05", "5.8%"]


def test_median_split_keeps_the_last_rounds_level() -> None:
    first = Split("served", 20.0, 15.0, 3.0, 4, 2.0, None, 12.0, None)
    last = Split("served", 22.0, 15.0, 3.0, 16, 1.0, None, 12.0, None)
    assert median_split([first, last]).saturation_concurrency == 16
    assert median_split([first, last]).served_ms == 21.0


# --- report: rows, ratios over the peer, what is printed and written ----------------------


def test_a_round_lists_its_rows_and_the_ratios_over_the_peer() -> None:
    local = measurement("onnxruntime", 1, (10.0,), 0.05)
    served = (measurement("served", 1, (10.0,), 0.05), measurement("served", 4, (10.0,), 0.025))
    others = {
        "fused": (measurement("fused", 1, (10.0,), 1 / 30),),
        "pytriton": (
            measurement("pytriton", 1, (10.0,), 0.1),
            measurement("pytriton", 4, (10.0,), 0.05),
        ),
    }
    result = TaskResult(TASK, 2, local, measurement("pytorch", 1, (20.0,), 0.1), served, (), others)
    assert [(row.pipeline, row.concurrency) for row in result.rows()] == [
        ("onnxruntime", 1),
        ("pytorch", 1),
        ("served", 1),
        ("served", 4),
        ("fused", 1),
        ("pytriton", 1),
        ("pytriton", 4),
    ]
    assert result.rows_of("grpc_bytes") == served  # not measured: the default's rows
    ratios = result.peer_ratios()
    assert ratios["served_over_pytriton"] == pytest.approx({"1": 2.0, "4": 2.0})  # 20/10, 40/20
    assert ratios["fused_over_pytriton"] == pytest.approx({"1": 3.0})  # 30/10
    assert list(result.summary()) == [
        "studies",
        "onnxruntime",
        "pytorch",
        "served",
        "ratios",
        "breakdown",
        "fused",
        "pytriton",
        "transport_probe",
        "split",
    ]


def test_pooled_percentiles_take_every_rounds_latencies_together() -> None:
    rows = [measurement("served", 1, (10.0, 20.0), 1.0), measurement("served", 1, (30.0,), 1.0)]
    assert pooled_percentile(rows, 50) == 20.0
    assert pooled_percentile(rows, 100) == 30.0


def test_a_task_prints_its_table_the_last_breakdown_and_the_split() -> None:
    rounds = TaskRounds(TASK, (split_round(), split_round()))
    table, last_breakdown, split = task_blocks(rounds)
    assert table.startswith(f"{TASK}: 2 images/study, 4 distinct studies, 2 timed requests")
    assert last_breakdown.startswith(f"round 2 of 2: {TASK}: where a study's time goes")
    # the in-process CPU per study (12 ms) closes each breakdown line
    assert [line.split()[-1] for line in last_breakdown.splitlines()[2:]] == ["12.0", "12.0"]
    assert split.startswith(f"{TASK}: work, transport and everything else")
    bare = TaskResult(TASK, 4, *(split_round().rows()[:2]), split_round().served)
    assert len(task_blocks(TaskRounds(TASK, (bare,)))) == 1  # no statistics, no probe
    summary = rounds.summary()
    assert list(summary) == ["studies", "rounds", "ratios", "transport_probe", "split"]
    assert "transport_probe" not in summary["rounds"][0]  # once per task
    assert [each["form"] for each in summary["split"]] == ["served", "fused"]


def sweep_points() -> list[SweepPoint]:
    return [
        SweepPoint(
            images,
            measurement("onnxruntime", 1, (5.0 * images,), 0.01 * images, images=images),
            (
                measurement("served", 1, (6.0 * images,), 0.02 * images, images=images),
                measurement("served", 16, (9.0 * images,), 0.01 * images, images=images),
            ),
        )
        for images in (1, 4)
    ]


def test_the_sweep_table_has_a_row_per_point_and_pipeline() -> None:
    lines = format_sweep("esophageal_cancer_ct", sweep_points()).splitlines()
    assert lines[0] == "cost vs images per study: esophageal_cancer_ct"
    assert lines[1].split()[:4] == ["images", "reqs", "pipeline", "conc"]
    assert [line.split()[:2] for line in lines[2:]] == [["1", "1"]] * 3 + [["4", "1"]] * 3
    assert lines[3].split()[2:6] == ["served", "gRPC", "1", "50.00"]  # 1 study in 0.02 s


def test_the_document_holds_the_settings_tuning_tasks_and_sweep(tmp_path: Path) -> None:
    rounds = [TaskRounds(TASK, (split_round(),))]
    content = document({"requests": 2}, Tuning(), rounds, sweep_points(), "esophageal_cancer_ct")
    assert list(content) == ["command", "machine", "settings", "tuning", "tasks", "images_sweep"]
    assert content["command"] == "abdoserve bench serving"
    assert content["tuning"]["net_intra_op_threads"] == 2
    sweep = content["images_sweep"]
    assert [point["images"] for point in sweep["points"]] == [1, 4]
    assert [row["concurrency"] for row in sweep["points"][1]["served"]] == [1, 16]
    json.dumps(content)  # JSON-ready throughout
    assert document({}, Tuning(), rounds, [], "x")["images_sweep"] is None
    write_plot(tmp_path / "plot.png", rounds, sweep_points())
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- pipelines: the build record, the in-process timing ----------------------------------


def test_the_build_record_keeps_the_tasks_text_values(tmp_path: Path) -> None:
    record = {TASK: {"weights": "phantom", "sha256": "ab12", "params": 3}, "other": {}}
    (tmp_path / "BUILD.json").write_text(json.dumps(record))
    assert build_record(tmp_path, TASK) == {"weights": "phantom", "sha256": "ab12"}


def test_in_process_timing_warms_up_at_most_three_requests() -> None:
    calls: list[int] = []

    class Recorder:
        name = "onnxruntime"

        def __init__(self) -> None:
            self.pool = [study((1, 1, 1))]

        def __call__(self, number: int) -> str:
            calls.append(number)
            return "{}"

    row = time_in_process(cast(InProcess, Recorder()), 2)
    assert calls == [0, 1, 0, 1]  # a warm-up of min(3, 2)
    assert (row.pipeline, row.requests, row.images_per_study) == ("onnxruntime", 2, 3.0)
    calls.clear()
    time_in_process(cast(InProcess, Recorder()), 5)
    assert calls == [0, 1, 2, 0, 1, 2, 3, 4]


# --- serving: the options, the plan, the forms a server takes -----------------------------


def parsed(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serving.add_arguments(parser)
    return parser.parse_args(argv)


def test_the_list_options_parse_or_refuse() -> None:
    assert serving.int_list("1,4,16") == (1, 4, 16)
    assert serving.int_list(" None ") == ()
    for bad in ("0", "1,x"):
        with pytest.raises(argparse.ArgumentTypeError):
            serving.int_list(bad)
    assert serving.form_list("served, fused,") == ("served", "fused")
    for bad in ("served,bytes", " , "):
        with pytest.raises(argparse.ArgumentTypeError, match="forms are grpc_bytes"):
            serving.form_list(bad)


def test_quick_and_full_plans() -> None:
    quick = serving.make_plan(parsed(["--quick"]))
    assert (quick.tasks, quick.requests, quick.concurrency, quick.images, quick.pool) == (
        (TASK,),
        10,
        (1, 4),
        (),
        2,
    )
    assert quick.built_tasks == (TASK,)
    full = serving.make_plan(parsed(["--requests", "50", "--without-scores"]))
    assert (len(full.tasks), full.requests, full.concurrency, full.images) == (
        5,
        50,
        (1, 4, 16, 64),
        (1, 4, 16, 64),
    )
    assert (full.pool, full.forms, full.scores, full.rounds) == (4, FORMS, False, 3)
    swept = serving.make_plan(parsed(["--quick", "--images", "2"]))
    assert swept.built_tasks == (TASK, "esophageal_cancer_ct")
    with pytest.raises(ValueError, match="unknown task"):
        serving.make_plan(parsed(["--tasks", "spleen_ct"]))
    with pytest.raises(ValueError, match="at most 64"):
        serving.make_plan(parsed(["--images", "65"]))


def test_bigger_sweep_studies_get_proportionally_fewer_requests() -> None:
    plan = serving.make_plan(parsed(["--requests", "200"]))
    assert [plan.sweep_requests(images) for images in (1, 8, 16, 64)] == [200, 200, 100, 25]
    small = serving.make_plan(parsed(["--requests", "10"]))
    assert small.sweep_requests(64) == 10  # never under min(requests, 10)


def test_a_server_without_region_or_fused_pipeline_takes_the_other_forms(
    capsys: pytest.CaptureFixture[str],
) -> None:
    plan = serving.make_plan(parsed(["--quick"]))
    target = Target("localhost:1", Tuning())
    assert serving.usable_forms(plan, target, TASK) == ("grpc_bytes", "served", "pytriton")
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        "shared_memory skipped: no shared region (--shared-region, --shm-key-file)",
        f"fused skipped: the server has no model fused_{TASK}",
        "fused_shared_memory skipped: no shared region (--shared-region, --shm-key-file)",
    ]
    assert serving.measure_probes(plan, target, TASK, [], ("served",)) == {}  # no probe
    assert serving.served_round(plan, target, TASK, [], forms=("pytriton",), peer=None) == ({}, [])


def test_a_round_puts_the_clients_default_form_first() -> None:
    local = [measurement("onnxruntime", 1, (1.0,), 1.0), measurement("pytorch", 1, (2.0,), 1.0)]
    as_bytes = [measurement("grpc_bytes", 1, (3.0,), 1.0)]
    packed = [measurement("served", 1, (4.0,), 1.0)]
    pool = [study((1,))] * 3
    both = serving.task_result(
        TASK, pool, local, {"grpc_bytes": as_bytes, "served": packed}, parts=[], probes={}
    )
    assert (both.studies, both.served, list(both.others)) == (3, tuple(packed), ["grpc_bytes"])
    alone = serving.task_result(TASK, pool, local, {"grpc_bytes": as_bytes}, parts=[], probes={})
    assert (alone.served, alone.others) == (tuple(as_bytes), {})
