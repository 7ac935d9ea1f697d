"""The Prometheus config, rules and Grafana dashboard, checked without a server:
promtool validates them and runs the rules' unit tests; every expression names
only metrics that exist (ours, Triton's, or our recording rules)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from abdoserve.deploy.prometheus_server import (
    JOB,
    PROMETHEUS_DIR,
    PrometheusError,
    PrometheusServer,
    render_config,
)
from abdoserve.deploy.supervisor_metrics import SupervisorMetrics
from abdoserve.preprocessing.tasks import TASKS, get_task
from abdoserve.serving.drift_metrics import DriftMetrics
from abdoserve.serving.metrics import IntakeMetrics
from abdoserve.serving.routing_metrics import RoutingMetrics

RULES_DIR = PROMETHEUS_DIR / "rules"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
DASHBOARD = PROMETHEUS_DIR.parent / "grafana" / "abdoserve-dashboard.json"

# Seen on the embedded Triton 2.51 server's /metrics (CPU build), and checked
# against a live one by tests/integration/test_prometheus.py.
TRITON_METRICS = frozenset(
    {
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_input_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us",
        "nv_inference_pending_request_count",
        "nv_cpu_utilization",
        "nv_cpu_memory_total_bytes",
        "nv_cpu_memory_used_bytes",
        "nv_pinned_memory_pool_total_bytes",
        "nv_pinned_memory_pool_used_bytes",
    }
)
PROMETHEUS_METRICS = frozenset({"up"})
PROMQL_WORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool"}
)


class FakeMetricFamily:
    """pb_utils.MetricFamily stand-in that records the families IntakeMetrics declares."""

    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
    declared: dict[str, str] = {}  # noqa: RUF012 - filled by the constructor, read by the test

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.declared[name] = kind

    def Metric(self, labels: dict[str, str], buckets: list[float] | None = None) -> Any:
        return None


class FakePbUtils:
    MetricFamily = FakeMetricFamily


def our_metrics() -> set[str]:
    """Sample names of the families every served request feeds, as IntakeMetrics
    declares them."""
    return declared_metrics(lambda: IntakeMetrics(FakePbUtils(), "bone_density_ct"))


def every_family() -> set[str]:
    """Ours, with the families that appear once versions compare, fail or are answered
    for a task (routing, drift): what a rule or the dashboard may name."""

    def declare() -> None:
        IntakeMetrics(FakePbUtils(), "bone_density_ct")
        RoutingMetrics(FakePbUtils(), "bone_density_ct")
        for task in ("bone_density_ct", "liver_mass_ct"):  # a score, and classes
            DriftMetrics(FakePbUtils(), task, get_task(task).output)

    return declared_metrics(declare)


def declared_metrics(declare: Callable[[], object]) -> set[str]:
    FakeMetricFamily.declared.clear()
    declare()
    names: set[str] = set()
    for name, kind in FakeMetricFamily.declared.items():
        suffixes = ("_bucket", "_count", "_sum") if kind == "histogram" else ("",)
        names.update(name + suffix for suffix in suffixes)
    return names


def supervisor_metrics() -> set[str]:
    """Sample names of the supervisor's families (its own /metrics, not Triton's)."""
    return {
        family.name + ("_total" if family.type == "counter" else "")
        for family in SupervisorMetrics().registry.collect()
    }


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (functions, keywords and labels left out)."""
    text = re.sub(r'"[^"]*"|\'[^\']*\'', "", expr)  # strings (label values, regexes)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)  # label matchers, ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = re.findall(r"(?<![\w.$])([a-zA-Z_:][\w:]*)\b(?!\s*\()", text)
    return {name for name in names if name not in PROMQL_WORDS}


def rule_blocks(path: Path) -> list[tuple[str, str, str]]:
    """(kind, name, text) of each rule; the files keep one `- record:`/`- alert:` per rule."""
    text = path.read_text()
    starts = list(re.finditer(r"^\s*- (record|alert): (\S+)$", text, flags=re.MULTILINE))
    ends = [match.start() for match in starts[1:]] + [len(text)]
    return [
        (match.group(1), match.group(2), text[match.start() : end])
        for match, end in zip(starts, ends, strict=True)
    ]


def rule_expr(block: str) -> str:
    """A rule's expr: inline, or a folded block (`>-`) of deeper-indented lines."""
    match = re.search(r"^( *)expr: (.*)$", block, flags=re.MULTILINE)
    assert match is not None, block
    indent, rest = len(match.group(1)), match.group(2).strip()
    if rest not in (">-", ">", "|", "|-"):
        return rest
    lines = []
    for line in block[match.end() + 1 :].splitlines():
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        lines.append(line.strip())
    return " ".join(lines).strip()


def all_rules() -> list[tuple[str, str, str]]:
    return [rule for path in RULE_FILES for rule in rule_blocks(path)]


def recording_rules() -> set[str]:
    return {name for kind, name, _ in all_rules() if kind == "record"}


def gateway_metrics() -> set[str]:
    """Sample names of the DICOM gateway's families (its own /metrics)."""
    from abdoserve.deploy.gateway.metrics import GatewayMetrics

    names: set[str] = set()
    for family in GatewayMetrics().registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_count", "_sum"))
        else:
            names.add(family.name)
    return names


def known_metrics() -> set[str]:
    return (
        every_family()
        | supervisor_metrics()
        | gateway_metrics()
        | TRITON_METRICS
        | PROMETHEUS_METRICS
        | recording_rules()
    )


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def dashboard_exprs() -> list[str]:
    return [
        target["expr"]
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    # `make test` installs Debian's prometheus: a missing promtool is a broken set-up, not a skip.
    assert found is not None, "promtool is not installed (`make install` installs it)"
    return found


def run_promtool(promtool: str, *args: str | Path) -> str:
    done = subprocess.run(
        [promtool, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


# --- promtool ------------------------------------------------------------------


def test_promtool_accepts_the_config(promtool: str) -> None:
    output = run_promtool(promtool, "check", "config", PROMETHEUS_DIR / "prometheus.yml")
    assert "SUCCESS" in output and "rules found" in output  # the rule_files glob matched


def test_promtool_accepts_the_rules(promtool: str) -> None:
    assert len(RULE_FILES) == 2
    output = run_promtool(promtool, "check", "rules", *RULE_FILES)
    assert output.count("SUCCESS") == 2


def test_promtool_rule_unit_tests_pass(promtool: str) -> None:
    tests = sorted((PROMETHEUS_DIR / "tests").glob("*.test.yml"))
    assert tests
    output = run_promtool(promtool, "test", "rules", *tests)
    assert "SUCCESS" in output


def test_generated_test_config_is_valid(promtool: str, tmp_path: Path) -> None:
    config = tmp_path / "prometheus.yml"
    config.write_text(render_config(["127.0.0.1:8002", "127.0.0.1:9002"], interval_s=1))
    output = run_promtool(promtool, "check", "config", config)
    assert "SUCCESS" in output
    assert json.loads(config.read_text())["scrape_configs"][0]["job_name"] == JOB


def test_dashboard_expressions_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """promtool parses each expression, made into a recording rule with variables filled."""
    rules = []
    for number, expr in enumerate(dashboard_exprs()):
        concrete = expr.replace("${task:regex}", ".+").replace("$task", ".+")
        concrete = concrete.replace("$__rate_interval", "1m")
        rules.append({"record": f"dashboard:expr_{number}", "expr": concrete})
    rule_file = tmp_path / "dashboard.yml"
    rule_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert "SUCCESS" in run_promtool(promtool, "check", "rules", rule_file)


# --- names ---------------------------------------------------------------------


def test_metric_names_are_found_in_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, task) (rate(a_bucket{task=~"$task"}[5m])))'
        ' / 1e6 / on (model) group_left b:c:rate1m unless absent(up{job="x"})'
    )
    assert metric_names(expr) == {"a_bucket", "b:c:rate1m", "up"}


def test_our_families_are_those_the_preprocess_model_declares() -> None:
    assert {
        "abdoserve_preprocess_duration_seconds_bucket",
        "abdoserve_rejected_requests_total",
        "abdoserve_images_per_request_count",
        "abdoserve_received_bytes_total",
    } <= our_metrics()


def test_rules_reference_only_existing_metrics() -> None:
    known = known_metrics()
    for _, name, block in all_rules():
        unknown = metric_names(rule_expr(block)) - known
        assert not unknown, f"{name} uses unknown metrics {unknown}"


def test_recording_rules_follow_the_naming_convention() -> None:
    for name in recording_rules():
        level, metric, operations = name.split(":")
        assert level and operations and metric.startswith(("nv_", "abdoserve_")), name


def test_every_alert_has_for_severity_and_annotations() -> None:
    alerts = [(name, block) for kind, name, block in all_rules() if kind == "alert"]
    assert len(alerts) >= 5
    for name, block in alerts:
        assert re.search(r"^\s+for: \d+[smh]$", block, flags=re.MULTILINE), name
        assert re.search(r"^\s+severity: (warning|critical)$", block, flags=re.MULTILINE), name
        assert "summary:" in block and "description:" in block, name


def test_model_not_ready_alert_covers_every_task() -> None:
    [block] = [block for _, name, block in all_rules() if name == "AbdoServeModelNotReady"]
    assert set(re.findall(r'model="(\w+)"', rule_expr(block))) == set(TASKS)
    assert f'job="{JOB}"' in block


# --- the Grafana dashboard -----------------------------------------------------


def test_dashboard_is_importable_with_a_datasource_input() -> None:
    document = dashboard()
    assert document["schemaVersion"] >= 36 and document["uid"] == "abdoserve"
    assert [item["name"] for item in document["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [panel["id"] for panel in document["panels"]]
    assert len(ids) == len(set(ids))
    for panel in document["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        for item in (panel, *panel.get("targets", [])):
            if "datasource" in item:
                assert item["datasource"]["uid"] == "${DS_PROMETHEUS}"
    [variable] = document["templating"]["list"]
    assert variable["name"] == "task"
    assert re.fullmatch(r"label_values\(\w+, task\)", variable["query"]["query"])


def test_dashboard_references_only_existing_metrics() -> None:
    known = known_metrics()
    for expr in dashboard_exprs():
        unknown = metric_names(expr) - known
        assert not unknown, f"{expr!r} uses unknown metrics {unknown}"


def test_dashboard_shows_every_view_the_issue_asks_for() -> None:
    used = set().union(*(metric_names(expr) for expr in dashboard_exprs()))
    assert {
        "task:nv_inference_request_success:rate1m",  # throughput
        "task_stage:abdoserve_preprocess_duration_seconds:p50_rate5m",  # latency percentiles
        "task_stage:abdoserve_preprocess_duration_seconds:p95_rate5m",
        "task_stage:abdoserve_preprocess_duration_seconds:p99_rate5m",
        "task:nv_inference_request_seconds_per_request:rate1m",
        "model:nv_inference_queue_seconds_per_request:rate1m",  # queue vs compute
        "model:nv_inference_compute_infer_seconds_per_request:rate1m",
        "task_reason:abdoserve_rejected_requests:rate5m",  # rejects by reason
        "task:abdoserve_images_per_request:avg_rate5m",
        "task:abdoserve_received_bytes:rate5m",
    } <= used


# --- the helper that starts a real Prometheus ----------------------------------


def test_a_prometheus_that_cannot_start_is_reported(promtool: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, not listening: readiness probes fail fast
        server = PrometheusServer(
            ["127.0.0.1:1"], port=taken.getsockname()[1], data_dir=tmp_path, interval_s=1
        )
        with pytest.raises(PrometheusError, match="exited early"):
            server.start()
    assert server.process is None
    assert "address already in use" in server.log_file.read_text()
