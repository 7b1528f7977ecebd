"""deploy/kubernetes/kserve: the ServingRuntime and InferenceService against KServe's published CRD
facts, and foldserve serving the model the way KServe hands it over (at /mnt/models).

No KServe schema ships offline, so the facts are written down here, read from KServe's own
definitions (the CRDs config/crd/full/serving.kserve.io_{servingruntimes,inferenceservices}.yaml
and pkg/constants/constants.go of kserve/kserve, 2026-08):
- ServingRuntime and ClusterServingRuntime are serving.kserve.io/v1alpha1; their spec requires
  `containers` and allows only the fields in RUNTIME_SPEC_FIELDS; a supportedModelFormats entry
  requires `name` and has only name, version, autoSelect (boolean) and priority (integer);
  protocolVersions are among v1, v2, grpc-v1, grpc-v2.
- InferenceService is serving.kserve.io/v1beta1; its spec requires `predictor`; predictor.model
  .modelFormat requires `name`; predictor.scaleMetric is one of cpu, memory, concurrency, rps.
- The deployment mode (annotation serving.kserve.io/deploymentMode) decides which scale metrics
  work (KServe's autoscaling docs): RawDeployment's HPA takes cpu and memory; Serverless's
  Knative autoscaler concurrency and rps.
- The container KServe wires the model into is named `kserve-container`; the storage initializer
  puts the storageUri's content at /mnt/models; KServe routes HTTP to port 8080.
The containers themselves are Kubernetes Containers: validated with the Kubernetes schemas.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import kubernetes_validate
import numpy as np
import pytest

from service.app import create_app
from service.cli import build_parser, settings_from_args
from service.settings import Settings
from service.store import open_store, read_manifest
from tests.deploy.conftest import DOCKERFILE, KUBERNETES, ROOT, STORE, yaml_documents
from tests.deploy.dockerfile import env_pairs, parse
from tests.service.conftest import serve

RUNTIME = KUBERNETES / "kserve" / "servingruntime.yaml"
SERVICE = KUBERNETES / "kserve" / "inferenceservice.yaml"
SERVICES = sorted((KUBERNETES / "kserve").glob("inferenceservice*.yaml"))
MODE_METRICS = {"RawDeployment": {"cpu", "memory"}, "Serverless": {"concurrency", "rps"}}
RUNTIME_SPEC_FIELDS = {
    "affinity", "annotations", "builtInAdapter", "containers", "disabled", "grpcDataEndpoint",
    "grpcEndpoint", "hostIPC", "httpDataEndpoint", "imagePullSecrets", "labels", "multiModel",
    "nodeSelector", "protocolVersions", "replicas", "resourceClaims", "schedulerName",
    "storageHelper", "supportedModelFormats", "tolerations", "volumes", "workerSpec",
}  # fmt: skip
MODEL_FORMAT_FIELDS = {"name", "version", "autoSelect", "priority"}
PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}
SCALE_METRICS = {"cpu", "memory", "concurrency", "rps"}
MODEL_CONTAINER = "kserve-container"
MODEL_MOUNT = "/mnt/models"
HTTP_PORT = 8080
GRPC_PORT = 8081  # KServe routes gRPC predictors to a port named h2c, 8081 by its convention


def runtime() -> dict[str, Any]:
    (doc,) = yaml_documents(RUNTIME)
    return doc


def inference_service(path: Path = SERVICE) -> dict[str, Any]:
    (doc,) = yaml_documents(path)
    return doc


def model_container() -> dict[str, Any]:
    (found,) = [c for c in runtime()["spec"]["containers"] if c["name"] == MODEL_CONTAINER]
    return dict(found)


def runtime_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """What `foldserve serve` makes of the image's environment and the runtime's arguments,
    with KServe's {{.Name}} filled in."""
    monkeypatch.delenv("FOLDSERVE_GRPC", raising=False)  # the test suite's, not the image's
    for key, value in env_pairs(parse(DOCKERFILE)[-1].one("ENV")):
        if key.startswith("FOLDSERVE_"):
            monkeypatch.setenv(key, value)
    for pair in model_container().get("env", []):
        monkeypatch.setenv(pair["name"], pair["value"])
    args = [arg.replace("{{.Name}}", name) for arg in model_container()["args"]]
    return settings_from_args(build_parser().parse_args(["serve", *args]))


def test_the_runtime_has_the_structure_kserve_defines() -> None:
    doc = runtime()
    assert doc["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert doc["kind"] in {"ServingRuntime", "ClusterServingRuntime"}
    spec = doc["spec"]
    assert set(spec) <= RUNTIME_SPEC_FIELDS and spec["containers"]
    for entry in spec["supportedModelFormats"]:
        assert "name" in entry and set(entry) <= MODEL_FORMAT_FIELDS
        assert isinstance(entry.get("autoSelect", False), bool)
        assert isinstance(entry.get("priority", 0), int)
    assert "v2" in spec["protocolVersions"] and set(spec["protocolVersions"]) <= PROTOCOLS
    # Its containers and volumes are a pod's: the Kubernetes schemas know them.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "runtime"},
        "spec": {"containers": spec["containers"], "volumes": spec.get("volumes", [])},
    }
    kubernetes_validate.validate(pod, kubernetes_validate.utils.latest_version(), strict=True)


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_the_inference_service_has_the_structure_kserve_defines(path: Path) -> None:
    doc, spec = inference_service(path), runtime()["spec"]
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert doc["kind"] == "InferenceService"
    predictor = doc["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"]["name"] in {f["name"] for f in spec["supportedModelFormats"]}
    assert model["runtime"] == runtime()["metadata"]["name"]
    assert model["protocolVersion"] in spec["protocolVersions"]
    assert predictor["scaleMetric"] in SCALE_METRICS
    mode = doc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]
    assert predictor["scaleMetric"] in MODE_METRICS[mode], f"{mode} cannot scale on it"
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert isinstance(predictor["scaleTarget"], int)
    # Per replica, under one process's 12,030 req/s for one digits-mlp sample (performance.md).
    assert predictor["scaleMetric"] != "rps" or predictor["scaleTarget"] < 12_030


def test_the_runtime_runs_the_image_as_kserve_wires_it(monkeypatch: pytest.MonkeyPatch) -> None:
    pod = model_container()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert pod["image"] == f"foldserve:{version}"
    assert "command" not in pod, "the arguments go to the image's entrypoint, foldserve serve"
    name = inference_service()["metadata"]["name"]
    settings = runtime_settings(name, monkeypatch)
    assert str(settings.model_store) == MODEL_MOUNT
    assert (settings.host, settings.port) == ("0.0.0.0", HTTP_PORT)
    assert [p["containerPort"] for p in pod["ports"]] == [HTTP_PORT]
    assert settings.grpc and settings.grpc_port == GRPC_PORT  # what a grpc-v2 service exposes
    assert settings.default_model == name
    # No volume: one process writes nothing, even to /tmp (tests/deploy/test_image_recipe.py).
    assert settings.workers == 1 and not runtime()["spec"].get("volumes")
    box = pod["securityContext"]
    assert box["runAsNonRoot"] is True and box["readOnlyRootFilesystem"] is True
    annotations = runtime()["spec"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == str(HTTP_PORT)


def test_both_modes_are_offered() -> None:
    modes = {
        inference_service(p)["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]
        for p in SERVICES
    }
    assert modes == set(MODE_METRICS)


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_the_inference_service_points_at_one_models_folder(path: Path) -> None:
    doc = inference_service(path)
    uri = urlparse(doc["spec"]["predictor"]["model"]["storageUri"])
    assert uri.scheme in {"pvc", "s3", "gs", "https", "hdfs", "webhdfs", "oci"}
    folder = Path(uri.path).name
    # One model's folder: it answers to the InferenceService's name (the default model) and to
    # its manifests' name, whichever the client uses.
    assert open_store(STORE / folder).name == folder


def test_foldserve_serves_what_the_storage_initializer_puts_at_mnt_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = inference_service()
    name = doc["metadata"]["name"]
    folder = Path(urlparse(doc["spec"]["predictor"]["model"]["storageUri"]).path).name
    assert name != folder  # the InferenceService is not named after the model: still served
    mounted = tmp_path / "mnt" / "models"
    shutil.copytree(STORE / folder, mounted)  # the storageUri's folder, as KServe copies it
    settings = runtime_settings(name, monkeypatch).model_copy(update={"model_store": mounted})
    golden = read_manifest(mounted / "1").golden
    x = np.asarray(golden.inputs, dtype=np.float32)
    request = {
        "inputs": [
            {
                "name": read_manifest(mounted / "1").inputs[0].name,
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    readiness = model_container()["readinessProbe"]["httpGet"]["path"]
    with serve(create_app(settings)) as base:
        assert httpx.get(base + readiness).status_code == 200
        assert httpx.get(f"{base}/v2/models/{name}/ready").status_code == 200
        answer = httpx.post(f"{base}/v2/models/{name}/infer", json=request)
    assert answer.status_code == 200, answer.text
    (out,) = answer.json()["outputs"]
    np.testing.assert_allclose(
        np.reshape(out["data"], out["shape"]), np.asarray(golden.outputs), atol=1e-4
    )


def test_a_grpc_service_exposes_the_runtimes_grpc_port_as_h2c() -> None:
    grpc_services = [
        p
        for p in SERVICES
        if inference_service(p)["spec"]["predictor"]["model"]["protocolVersion"] == "grpc-v2"
    ]
    assert grpc_services, "no InferenceService example over gRPC"
    for path in grpc_services:
        (port,) = inference_service(path)["spec"]["predictor"]["model"]["ports"]
        assert (port["name"], port["containerPort"]) == ("h2c", GRPC_PORT)
