"""A real Prometheus scrapes the test server: our series and Triton's arrive with the
counts of the requests sent, the recording rules evaluate, the alert rules stay
healthy, and no label carries a patient identifier."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from abdoserve.deploy.embedded import EmbeddedServer, free_port
from abdoserve.deploy.prometheus_server import JOB, PrometheusServer, binary
from abdoserve.export.phantom import build_study
from tests.integration.triton_calls import infer
from tests.tools.test_prometheus_files import TRITON_METRICS, all_rules, our_metrics

PATIENT_IDENTIFIERS = ("PHANTOM^ABDOMEN", "PHANTOM-")
SETTLE_TIMEOUT_S = 20.0

# What the test sends, and the counters (as PromQL sums) that must move by exactly that.
GOOD = {"bone_density_ct": 7, "liver_fibrosis_ct": 3}
BAD = {("bone_density_ct", "not_dicom"): 2, ("liver_fibrosis_ct", "wrong_modality"): 2}
COUNTERS = {
    **{
        f'sum(nv_inference_request_success{{model="{task}"}})': count
        for task, count in GOOD.items()
    },
    **{
        f'sum(abdoserve_rejected_requests_total{{task="{task}",reason="{reason}"}})': count
        for (task, reason), count in BAD.items()
    },
    # Prepared studies only: a refused one never reaches the end of preprocessing.
    'sum(abdoserve_preprocess_duration_seconds_count{task="bone_density_ct",stage="total"})': 7,
    # Received before validation: the refused studies count too.
    'sum(abdoserve_images_per_request_count{task="bone_density_ct"})': 7 + 2,
}
FAILURES = 'sum(nv_inference_request_failure{model="liver_fibrosis_ct"})'


@pytest.fixture(scope="module")
def prometheus(
    server: EmbeddedServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusServer]:
    binary()  # raises with the install hint: `make test` installs Debian's prometheus
    target = f"{server.options.host}:{server.ports.metrics}"
    data_dir = tmp_path_factory.mktemp("prometheus")
    # Scrape and evaluate rules every second so the test waits seconds, not minutes.
    with PrometheusServer([target], port=free_port(), data_dir=data_dir, interval_s=1) as running:
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


def send_requests(grpc_url: str) -> None:
    client = grpcclient.InferenceServerClient(grpc_url)
    for task, count in GOOD.items():
        study = build_study(task, seed=3)
        for _ in range(count):
            infer(client, task, study.instances, study.clinical)
    mri = build_study("liver_fibrosis_mri", seed=3).instances[:1]
    fibrosis_clinical = build_study("liver_fibrosis_ct", seed=3).clinical
    bad_studies = {
        ("bone_density_ct", "not_dicom"): ([random.Random(7).randbytes(2048)], {}),
        ("liver_fibrosis_ct", "wrong_modality"): (list(mri), fibrosis_clinical),
    }
    for (task, reason), (instances, clinical) in bad_studies.items():
        for _ in range(BAD[(task, reason)]):
            with pytest.raises(InferenceServerException):
                infer(client, task, instances, clinical)


@dataclass(frozen=True)
class Observed:
    before: dict[str, float]
    after: dict[str, float]

    def increase(self, expr: str) -> float:
        return self.after[expr] - self.before[expr]


@pytest.fixture(scope="module")
def observed(prometheus: PrometheusServer, grpc_url: str) -> Observed:
    """Counters before and after the known requests (the session server is shared)."""
    exprs = [*COUNTERS, FAILURES]
    before = settled(prometheus, exprs)
    send_requests(grpc_url)
    return Observed(before, settled(prometheus, exprs))


def test_the_triton_target_is_up(prometheus: PrometheusServer) -> None:
    [sample] = prometheus.query(f'up{{job="{JOB}"}}')
    assert sample.value == 1


def test_counters_increase_by_exactly_what_was_sent(observed: Observed) -> None:
    increases = {expr: observed.increase(expr) for expr in COUNTERS}
    assert increases == COUNTERS


def test_failed_requests_reach_triton_failure_counter(observed: Observed) -> None:
    # At least once each: Triton 2.51 counts a failed ensemble request twice.
    assert observed.increase(FAILURES) >= BAD[("liver_fibrosis_ct", "wrong_modality")]


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
        'model:nv_inference_queue_over_compute:ratio_rate1m{model="bone_density_ct_preprocess"}',
        'model:nv_inference_batch_size:avg_rate1m{model="bone_density_ct_net"}',
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
        value(prometheus, 'model:nv_inference_batch_size:avg_rate1m{model="bone_density_ct_net"}')
        >= 1
    )


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
