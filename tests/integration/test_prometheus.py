"""A real Prometheus scrapes the test server (`serve`'s default shape: one fused model
per task): our series and Triton's arrive with the counts of the requests sent, the
recording rules evaluate and count the fused models' refusals as failures, the alert
rules stay healthy, and no label carries a patient identifier. The rules' arithmetic
for both shapes, side by side, is in their promtool test."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from abdoserve.deploy.embedded import EmbeddedServer, free_port
from abdoserve.deploy.prometheus_server import JOB, PrometheusServer, binary
from abdoserve.export.phantom import build_study
from abdoserve.preprocessing.tasks import TASKS
from tests.integration.triton_calls import infer
from tests.tools.test_prometheus_files import TRITON_METRICS, all_rules, our_metrics

PATIENT_IDENTIFIERS = ("PHANTOM^ABDOMEN", "PHANTOM-")
SETTLE_TIMEOUT_S = 20.0

# What the test sends, and the counters (as PromQL sums) that must move by exactly that.
GOOD = {"bone_density_ct": 7, "liver_fibrosis_ct": 3}
BAD = {("bone_density_ct", "not_dicom"): 2, ("liver_fibrosis_ct", "wrong_modality"): 2}
COUNTERS = {
    # The Python backend counts an error response as a success: a fused model's
    # refused studies are Triton successes, and its failure counter stays still.
    **{
        f'sum(nv_inference_request_success{{model="{task}"}})': count
        + sum(refused for (bad_task, _), refused in BAD.items() if bad_task == task)
        for task, count in GOOD.items()
    },
    **{f'sum(nv_inference_request_failure{{model="{task}"}})': 0 for task in GOOD},
    **{
        f'sum(abdoserve_rejected_requests_total{{task="{task}",reason="{reason}"}})': count
        for (task, reason), count in BAD.items()
    },
    # Prepared studies only: a refused one never reaches the end of preprocessing.
    'sum(abdoserve_preprocess_duration_seconds_count{task="bone_density_ct",stage="total"})': 7,
    # Received before validation: the refused studies count too.
    'sum(abdoserve_images_per_request_count{task="bone_density_ct"})': 7 + 2,
}
# Per scrape target, as the PodMonitor labels a pod: the autoscaling rule's labels.
POD = {"namespace": "local", "pod": "fused"}


@pytest.fixture(scope="module")
def prometheus(
    server: EmbeddedServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusServer]:
    binary()  # raises with the install hint: `make test` installs Debian's prometheus
    target = f"{server.options.host}:{server.ports.metrics}"
    data_dir = tmp_path_factory.mktemp("prometheus")
    # Scrape and evaluate rules every second so the test waits seconds, not minutes.
    with PrometheusServer(
        [target], port=free_port(), data_dir=data_dir, interval_s=1, target_labels={target: POD}
    ) as running:
        wait_for_scrape_after(running, 0.0, time.monotonic() + SETTLE_TIMEOUT_S)
        yield running


def value(prometheus: PrometheusServer, expr: str) -> float:
    """An instant query's single value; a counter with no series yet counts 0."""
    samples = prometheus.query(expr)
    assert len(samples) <= 1, samples
    return samples[0].value if samples else 0.0


def last_scrape(prometheus: PrometheusServer) -> float:
    samples = prometheus.query(f'timestamp(up{{job="{JOB}"}})')
    return samples[0].value if samples else 0.0


def wait_for_scrape_after(prometheus: PrometheusServer, moment: float, deadline: float) -> None:
    while last_scrape(prometheus) <= moment:
        assert time.monotonic() < deadline, f"no scrape after {moment} in time"
        time.sleep(0.2)


def settled(prometheus: PrometheusServer, exprs: list[str]) -> dict[str, float]:
    """The values once two successive scrapes, both after now, agree (bounded wait)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    wait_for_scrape_after(prometheus, time.time(), deadline)
    previous = {expr: value(prometheus, expr) for expr in exprs}
    while True:
        wait_for_scrape_after(prometheus, last_scrape(prometheus), deadline)
        current = {expr: value(prometheus, expr) for expr in exprs}
        if current == previous:
            return current
        previous = current


def send_bad(client: grpcclient.InferenceServerClient, *, once: bool = False) -> None:
    mri = build_study("liver_fibrosis_mri", seed=3).instances[:1]
    fibrosis_clinical = build_study("liver_fibrosis_ct", seed=3).clinical
    bad_studies = {
        ("bone_density_ct", "not_dicom"): ([random.Random(7).randbytes(2048)], {}),
        ("liver_fibrosis_ct", "wrong_modality"): (list(mri), fibrosis_clinical),
    }
    for (task, reason), (instances, clinical) in bad_studies.items():
        for _ in range(1 if once else BAD[(task, reason)]):
            with pytest.raises(InferenceServerException):
                infer(client, task, instances, clinical)


def send_requests(grpc_url: str) -> None:
    client = grpcclient.InferenceServerClient(grpc_url)
    for task, count in GOOD.items():
        study = build_study(task, seed=3)
        for _ in range(count):
            infer(client, task, study.instances, study.clinical)
    send_bad(client)


@dataclass(frozen=True)
class Observed:
    before: dict[str, float]
    after: dict[str, float]

    def increase(self, expr: str) -> float:
        return self.after[expr] - self.before[expr]


@pytest.fixture(scope="module")
def observed(prometheus: PrometheusServer, grpc_url: str) -> Observed:
    """Counters before and after the known requests (the session server is shared)."""
    # A refusal counter's series appears at its first increment, a sample rate() never
    # sees as an increase: refuse one study of each kind first, so the rules see the
    # counted ones.
    send_bad(grpcclient.InferenceServerClient(grpc_url), once=True)
    exprs = list(COUNTERS)
    before = settled(prometheus, exprs)
    send_requests(grpc_url)
    return Observed(before, settled(prometheus, exprs))


def test_the_triton_target_is_up(prometheus: PrometheusServer) -> None:
    [sample] = prometheus.query(f'up{{job="{JOB}"}}')
    assert sample.value == 1


def test_counters_increase_by_exactly_what_was_sent(observed: Observed) -> None:
    increases = {expr: observed.increase(expr) for expr in COUNTERS}
    assert increases == COUNTERS


def wait_for(prometheus: PrometheusServer, expr: str, holds: Callable[[float], bool]) -> float:
    """The value of `expr` once `holds` it (rules run on their own 1 s tick)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while not holds(found := value(prometheus, expr)):
        assert time.monotonic() < deadline, f"{expr} still {found}"
        time.sleep(0.2)
    return found


def test_the_rules_count_a_fused_models_refusals_as_failures(
    prometheus: PrometheusServer, observed: Observed
) -> None:
    # Triton's failure counter stayed still (COUNTERS): the refusals reach the failure
    # rule from abdoserve_rejected_requests_total, matched per scrape target. The most
    # over 5 minutes: each sample is the rate of its last minute only. A ratio may have
    # read 1 while only the first refusals were in its minute.
    for task in ("liver_fibrosis_ct", "bone_density_ct"):
        failures = f'max_over_time(task:nv_inference_request_failure:rate1m{{task="{task}"}}[5m])'
        wait_for(prometheus, failures, lambda found: found > 0)
        ratio = (
            f'max_over_time(task:nv_inference_request_failure:ratio_rate1m{{task="{task}"}}[5m])'
        )
        assert 0 < wait_for(prometheus, ratio, math.isfinite) <= 1
    # No study answered, refused or cancelled: 0, not absent.
    for rule in ("success", "failure", "cancelled"):
        [sample] = prometheus.query(
            f'task:nv_inference_request_{rule}:rate1m{{task="liver_mass_ct"}}'
        )
        assert sample.value == 0, rule


def test_the_tasks_are_the_fused_models_and_not_the_explain_models(
    prometheus: PrometheusServer, observed: Observed
) -> None:
    tasks = {
        sample.labels["task"]
        for sample in prometheus.query("task:nv_inference_request_success:rate1m")
    }
    assert tasks == set(TASKS)
    # The models that queue: each fused model and its explain model (no ensemble here).
    queued = {
        sample.labels["model"]
        for sample in prometheus.query("model:nv_inference_queue_seconds_per_request:rate1m")
    }
    assert queued == set(TASKS) | {f"{task}_explain" for task in TASKS}


def test_rejects_are_counted_by_reason(prometheus: PrometheusServer, observed: Observed) -> None:
    reasons = {
        sample.labels["reason"] for sample in prometheus.query("abdoserve_rejected_requests_total")
    }
    assert {"not_dicom", "wrong_modality"} <= reasons


def test_every_series_we_and_triton_name_arrives(
    prometheus: PrometheusServer, observed: Observed
) -> None:
    names = set(prometheus.api("label/__name__/values"))
    missing = (our_metrics() | TRITON_METRICS) - names
    assert not missing


def test_recording_rules_evaluate_to_numbers(
    prometheus: PrometheusServer, observed: Observed
) -> None:
    rules = {
        # `serve`'s default: the task's one fused model queues, computes and batches
        'model:nv_inference_queue_over_compute:ratio_rate1m{model="bone_density_ct"}',
        'model:nv_inference_batch_size:avg_rate1m{model="bone_density_ct"}',
        'task:nv_inference_request_success:rate1m{task="bone_density_ct"}',
        'task_stage:abdoserve_preprocess_duration_seconds:p95_rate5m{task="bone_density_ct",stage="total"}',
    }
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    pending = set(rules)
    while pending:  # rules run on their own 1 s tick, just after the scrape
        pending = {expr for expr in pending if not math.isfinite(value(prometheus, expr))}
        assert time.monotonic() < deadline, f"not evaluated in time: {pending}"
        time.sleep(0.2)
    assert value(prometheus, 'task:nv_inference_request_success:rate1m{task="bone_density_ct"}') > 0
    assert (
        value(prometheus, 'model:nv_inference_batch_size:avg_rate1m{model="bone_density_ct"}') >= 1
    )
    # The autoscaling signal of a pod serving fused models: a number, never NaN.
    labels = ",".join(f'{name}="{label}"' for name, label in POD.items())
    queued = wait_for(
        prometheus,
        f"namespace_pod:abdoserve_queue_seconds_per_study:rate1m{{{labels}}}",
        math.isfinite,
    )
    assert queued >= 0


def test_every_rule_is_healthy_and_no_model_is_missing(
    prometheus: PrometheusServer, observed: Observed
) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
        if all(rule["health"] != "unknown" for rule in rules):
            break
        assert time.monotonic() < deadline, "rules not evaluated in time"
        time.sleep(0.2)
    unhealthy = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert not unhealthy
    assert len(rules) == len(all_rules())
    # Pending or firing: absent() would have matched a task name that Triton does not serve.
    assert prometheus.query('ALERTS{alertname=~"AbdoServeModelNotReady|AbdoServeTritonDown"}') == []


def test_no_label_value_carries_a_patient_identifier(
    prometheus: PrometheusServer, observed: Observed
) -> None:
    for label in prometheus.api("labels"):
        for label_value in prometheus.api(f"label/{label}/values"):
            assert not any(identifier in label_value for identifier in PATIENT_IDENTIFIERS), (
                label,
                label_value,
            )
