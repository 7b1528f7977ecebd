"""deploy/kubernetes: every manifest valid against the Kubernetes schemas, and consistent with the
image, the server's settings and routes, and each other.

kubernetes-validate ships the API's JSON schemas, so this runs offline; strict mode refuses a
field the API does not have (a misspelled probe option would otherwise be dropped silently).
Custom resources (ServiceMonitor here, KServe's in test_kserve.py) have no schema there: their
structure is checked against the facts their CRDs state.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from service.app import create_app
from service.settings import Settings, unknown_env_names
from tests.deploy.conftest import (
    DOCKERFILE,
    KUBERNETES,
    ROOT,
    STORE,
    drain_bound_s,
    yaml_documents,
)
from tests.deploy.dockerfile import parse
from tests.service.conftest import serve

# The oldest Kubernetes still commonly run, and the newest schemas kubernetes-validate ships.
VERSIONS = ["1.30", kubernetes_validate.utils.latest_version()]
CUSTOM_KINDS = {
    "ServiceMonitor",
    "PrometheusRule",
    "ServingRuntime",
    "ClusterServingRuntime",
    "InferenceService",
}
NOT_RESOURCES = {"kustomization.yaml", "deployment-patch.yaml"}  # kustomize's own files
MANIFESTS = sorted(
    p.relative_to(KUBERNETES) for p in KUBERNETES.rglob("*.yaml") if p.name not in NOT_RESOURCES
)
BASE = KUBERNETES / "base"


def one(path: Path, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in yaml_documents(path) if d["kind"] == kind]
    return doc


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = one(BASE / "deployment.yaml", "Deployment")["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    (only,) = pod_spec()["containers"]
    return dict(only)


def configmap_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    data = one(BASE / "configmap.yaml", "ConfigMap")["data"]
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    return Settings()


def validate(doc: dict[str, Any]) -> None:
    for version in VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=str)
def test_every_resource_is_valid_against_the_kubernetes_schemas(manifest: Path) -> None:
    docs = yaml_documents(KUBERNETES / manifest)
    assert docs, f"{manifest} holds no resource"
    for doc in docs:
        if doc["kind"] not in CUSTOM_KINDS:
            validate(doc)


def test_strict_validation_refuses_a_misspelled_field() -> None:
    deployment = one(BASE / "deployment.yaml", "Deployment")
    broken = copy.deepcopy(deployment)
    probe = broken["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    probe["periodSecond"] = probe.pop("periodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError, match="periodSecond"):
        validate(broken)


def kustomize(folder: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.mark.parametrize(
    "folder",
    sorted(p.parent.relative_to(KUBERNETES) for p in KUBERNETES.rglob("kustomization.yaml")),
    ids=str,
)
def test_every_kustomization_renders_to_valid_resources(folder: Path) -> None:
    for doc in kustomize(KUBERNETES / folder):
        if doc["kind"] not in CUSTOM_KINDS:
            validate(doc)


def test_the_volume_overlay_serves_the_claims_store_read_only() -> None:
    docs = {d["kind"]: d for d in kustomize(KUBERNETES / "model-store-pvc")}
    spec = docs["Deployment"]["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    claim = volume["persistentVolumeClaim"]
    assert claim == {
        "claimName": docs["PersistentVolumeClaim"]["metadata"]["name"],
        "readOnly": True,
    }
    (pod,) = spec["containers"]
    (mount,) = [m for m in pod["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    assert {"name": "FOLDSERVE_MODEL_STORE", "value": mount["mountPath"]} in pod["env"]


def test_the_monitoring_kustomization_ships_the_dashboard_file_as_is() -> None:
    docs = kustomize(KUBERNETES / "monitoring")
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert configmap["metadata"]["labels"] == {"grafana_dashboard": "1"}
    shipped = (KUBERNETES / "monitoring" / "grafana-dashboard.json").read_text()
    assert configmap["data"]["foldserve.json"] == shipped


def test_the_pods_run_the_image_as_it_was_built(monkeypatch: pytest.MonkeyPatch) -> None:
    final = parse(DOCKERFILE)[-1]
    uid, _, gid = final.one("USER").args.partition(":")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    pod, spec = container(), pod_spec()
    assert pod["image"] == f"foldserve:{version}"
    assert "command" not in pod and "args" not in pod, "the image's entrypoint runs as it is"
    security = spec["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid))
    box = pod["securityContext"]
    assert box["readOnlyRootFilesystem"] is True and box["allowPrivilegeEscalation"] is False
    assert box["capabilities"] == {"drop": ["ALL"]}
    # The one writable path --workers needs (tests/deploy/test_image_recipe.py shows it is needed
    # and enough), in memory.
    (tmp,) = [m for m in pod["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == tmp["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    port, grpc_port = pod["ports"]
    assert (port["name"], grpc_port["name"]) == ("http", "grpc")
    exposed = [str(port["containerPort"]), str(grpc_port["containerPort"])]
    assert exposed == final.one("EXPOSE").args.split()
    settings = configmap_settings(monkeypatch)
    assert port["containerPort"] == settings.port  # the image's 8000
    assert grpc_port["containerPort"] == settings.grpc_port  # and 8001
    annotations = one(BASE / "deployment.yaml", "Deployment")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])


def test_the_settings_configmap_holds_only_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    data = one(BASE / "configmap.yaml", "ConfigMap")["data"]
    assert unknown_env_names(data) == []
    settings = configmap_settings(monkeypatch)  # every value parses
    assert (STORE / settings.default_model).is_dir(), "the default model is in the image's store"
    assert container()["envFrom"] == [{"configMapRef": {"name": "foldserve-settings"}}]


def test_the_probes_ask_routes_the_server_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    pod = container()
    probes = {
        name: pod[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert {p["port"] for p in probes.values()} == {pod["ports"][0]["name"]}
    settings = configmap_settings(monkeypatch).model_copy(update={"model_store": STORE})
    with serve(create_app(settings)) as base:
        for name, probe in probes.items():
            assert httpx.get(base + probe["path"]).status_code == 200, name
    assert probes["livenessProbe"]["path"] == "/healthz"  # answers while models still load
    assert probes["startupProbe"]["path"] == probes["readinessProbe"]["path"] == "/readyz"


def test_the_startup_probe_leaves_room_to_verify_the_models(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probe = container()["startupProbe"]
    budget_s = probe["failureThreshold"] * probe["periodSeconds"]
    settings = configmap_settings(monkeypatch).model_copy(update={"model_store": STORE})
    started = time.monotonic()
    with serve(create_app(settings), wait_loaded=False) as base:
        while httpx.get(f"{base}/readyz").status_code != 200:
            assert time.monotonic() - started < budget_s, "not ready within the startup budget"
            time.sleep(0.02)
        verify_s = time.monotonic() - started
    # Ten times this machine's time for the image's own store: a slower node, a cold disk.
    assert budget_s >= 10 * verify_s, f"{budget_s} s of startup probe for {verify_s:.2f} s here"


def test_the_grace_period_covers_the_prestop_pause_and_the_drain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = configmap_settings(monkeypatch)
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    pause_s = float(command[1])
    drain_s = drain_bound_s(settings)
    grace_s = pod_spec()["terminationGracePeriodSeconds"]
    assert grace_s >= pause_s + drain_s, f"{grace_s} s < {pause_s} s pause + {drain_s} s drain"
    assert pause_s >= 1, "endpoints take a moment to drop the pod: keep serving meanwhile"


def test_service_autoscalers_budget_and_monitor_select_these_pods() -> None:
    deployment = one(BASE / "deployment.yaml", "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = one(BASE / "service.yaml", "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    port_names = {p["name"] for p in container()["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names

    autoscalers = [
        one(BASE / "hpa.yaml", "HorizontalPodAutoscaler"),
        one(KUBERNETES / "autoscaling" / "hpa-requests.yaml", "HorizontalPodAutoscaler"),
    ]
    # Same name: applying the request-rate one replaces the CPU one instead of fighting it.
    assert len({h["metadata"]["name"] for h in autoscalers}) == 1
    budget = one(BASE / "pdb.yaml", "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for hpa in autoscalers:
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
        # An eviction never takes the last pod: the budget keeps fewer than the HPA's floor.
        assert budget["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]

    # ServiceMonitor, against prometheus-operator's CRD (monitoring.coreos.com/v1): spec is
    # required, and in it `selector` and `endpoints`; an endpoint's `port` names a Service port;
    # `interval` is a Prometheus duration.
    monitor = one(KUBERNETES / "monitoring" / "servicemonitor.yaml", "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"
        assert re.fullmatch(r"(\d+(ms|s|m|h))+", endpoint["interval"])


def test_the_request_rate_autoscaler_asks_for_what_the_adapter_serves() -> None:
    hpa = one(KUBERNETES / "autoscaling" / "hpa-requests.yaml", "HorizontalPodAutoscaler")
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    adapter = one(KUBERNETES / "autoscaling" / "prometheus-adapter-rules.yaml", "ConfigMap")
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    served = {rule["name"]["as"] for rule in rules}
    assert wanted and wanted <= served
    for rule in rules:
        # The adapter maps a series to the pod it came from by these two labels.
        assert rule["resources"]["overrides"].keys() == {"namespace", "pod"}
        assert re.match(rule["name"]["matches"], rule["seriesQuery"].split("{")[0])
    (target,) = [m["pods"]["target"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    # 8k per pod: under one process's measured 12,030 req/s (docs/performance.md).
    assert 0 < parse_quantity(target["averageValue"]) < 12_030


def parse_quantity(text: str) -> float:
    """A Kubernetes quantity with a decimal suffix (the HPA's averageValue)."""
    suffixes = {"m": 1e-3, "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]?)", text)
    assert match and match.group(2) in suffixes, text
    return float(match.group(1)) * suffixes[match.group(2)]


def test_the_grpc_probe_overlay_asks_the_grpc_port_what_readyz_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import grpc

    from service.rpc import health_pb2

    (deployment,) = [d for d in kustomize(KUBERNETES / "grpc-probes") if d["kind"] == "Deployment"]
    (pod,) = deployment["spec"]["template"]["spec"]["containers"]
    probe = pod["readinessProbe"]["grpc"]
    ports = {p["name"]: p["containerPort"] for p in pod["ports"]}
    settings = configmap_settings(monkeypatch)
    assert probe["port"] == ports["grpc"] == settings.grpc_port
    app = create_app(
        settings.model_copy(update={"model_store": STORE, "grpc": True, "grpc_port": 0})
    )
    with serve(app) as base:
        assert httpx.get(base + "/readyz").status_code == 200
        assert app.grpc is not None
        with grpc.insecure_channel(f"127.0.0.1:{app.grpc.port}") as channel:
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            answer = check(health_pb2.HealthCheckRequest(service=probe["service"]), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
