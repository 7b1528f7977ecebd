"""Drive a running foldserve with the real clients, unmodified: tritonclient's HTTP client and
the KServe Python SDK. Run by tests/service/test_real_clients.py with the clients' own python.

Reads the server's address, keys and an input batch as JSON on stdin; prints what each call
returned as JSON on stdout. An exception a client raises is reported, not hidden: its text is
the result of that call.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import traceback
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import tritonclient.http as triton
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.rest.v2_datamodels import (
    ModelMetadataResponse,
    ModelReadyResponse,
    ServerMetadataResponse,
)
from tritonclient.utils import InferenceServerException


def attempt(results: dict[str, Any], name: str, call: Callable[[], Any]) -> None:
    try:
        results[name] = call()
    except InferenceServerException as exc:
        results[name] = {
            "raised": type(exc).__name__,
            "status": exc.status(),
            "message": exc.message(),
        }
    except Exception as exc:
        results[name] = {
            "raised": type(exc).__name__,
            "message": str(exc),
            "trace": traceback.format_exc(),
        }


def with_tritonclient(config: dict[str, Any]) -> dict[str, Any]:
    client = triton.InferenceServerClient(url=config["url"].removeprefix("http://"))
    key = {"Authorization": f"Bearer {config['key']}"}
    manage = {"X-API-Key": config["management_key"]}
    model = config["model"]
    x = np.asarray(config["inputs"], dtype=np.float32)
    results: dict[str, Any] = {}

    def infer(binary: bool, version: str = "") -> list[Any]:
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        wanted = triton.InferRequestedOutput("logits", binary_data=binary)
        # NOTE: a new dict each time: tritonclient adds Inference-Header-Content-Length to the
        # headers it is given, and a JSON request sent with that stale header is malformed.
        answer = client.infer(
            model,
            [tensor],
            model_version=version,
            outputs=[wanted],
            headers=dict(key),
            request_id="t-1",
        )
        response = answer.get_response()
        assert response["id"] == "t-1", response
        assert response["model_version"] == "1", response
        return answer.as_numpy("logits").tolist()

    attempt(results, "is_server_live", lambda: client.is_server_live())
    attempt(results, "is_server_ready", lambda: client.is_server_ready())
    attempt(results, "is_model_ready", lambda: client.is_model_ready(model, headers=key))
    attempt(results, "get_server_metadata", lambda: client.get_server_metadata(headers=key))
    attempt(results, "get_model_metadata", lambda: client.get_model_metadata(model, headers=key))
    attempt(results, "get_model_config", lambda: client.get_model_config(model, headers=key))
    attempt(results, "infer_binary", lambda: infer(binary=True))
    attempt(results, "infer_json", lambda: infer(binary=False, version="1"))
    attempt(results, "stats_all", lambda: client.get_inference_statistics(headers=key))
    attempt(results, "stats_model", lambda: client.get_inference_statistics(model, headers=key))
    attempt(
        results, "stats_version", lambda: client.get_inference_statistics(model, "1", headers=key)
    )
    attempt(results, "index", lambda: client.get_model_repository_index(headers=manage))
    attempt(results, "unload", lambda: client.unload_model(model, headers=manage))
    attempt(results, "ready_after_unload", lambda: client.is_model_ready(model, headers=key))
    attempt(results, "infer_after_unload", lambda: infer(binary=True))
    attempt(results, "load", lambda: client.load_model(model, headers=manage))
    attempt(results, "ready_after_load", lambda: client.is_model_ready(model, headers=key))
    attempt(results, "infer_after_load", lambda: infer(binary=True))
    attempt(results, "index_without_key", lambda: client.get_model_repository_index())
    client.close()
    return results


async def with_kserve(config: dict[str, Any]) -> dict[str, Any]:
    url, model = config["url"], config["model"]
    key = {"Authorization": f"Bearer {config['key']}"}
    x = np.asarray(config["inputs"], dtype=np.float32)
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
    results: dict[str, Any] = {}

    async def infer(binary: bool) -> list[Any]:
        tensor = InferInput(name="x", shape=list(x.shape), datatype="FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        request = InferRequest(model_name=model, infer_inputs=[tensor], request_id="k-1")
        answer = await client.infer(url, request, model_name=model, headers=key)
        assert answer.id == "k-1" and answer.model_name == model, answer
        (output,) = answer.outputs
        assert output.name == "logits" and output.datatype == "FP32", output
        return output.as_numpy().tolist()

    async def run(name: str, call: Callable[[], Any]) -> None:
        try:
            results[name] = await call()
        except Exception as exc:
            results[name] = {"raised": type(exc).__name__, "message": str(exc)}

    await run("is_server_live", lambda: client.is_server_live(url))
    await run("is_server_ready", lambda: client.is_server_ready(url))
    await run("is_model_ready", lambda: client.is_model_ready(url, model, headers=key))
    await run("is_model_ready_without_key", lambda: client.is_model_ready(url, model))
    await run("infer_json", lambda: infer(binary=False))
    await run("infer_binary", lambda: infer(binary=True))
    await client.close()
    # The SDK's REST client has no metadata call: its own response models judge the answers.
    async with httpx.AsyncClient(base_url=url, headers=key) as http:
        for name, path, schema in [
            ("server_metadata", "/v2", ServerMetadataResponse),
            ("model_metadata", f"/v2/models/{model}", ModelMetadataResponse),
            ("model_ready", f"/v2/models/{model}/ready", ModelReadyResponse),
        ]:

            async def check(path: str = path, schema: Any = schema) -> Any:
                answer = await http.get(path)
                answer.raise_for_status()
                return schema.model_validate(answer.json()).model_dump(mode="json")

            await run(name, check)
    return results


def several_with_tritonclient(config: dict[str, Any]) -> dict[str, Any]:
    """A model of several inputs and outputs: one input binary and one JSON, in the reverse of
    the model's order; then its outputs asked for in another order, one binary, one JSON."""
    client = triton.InferenceServerClient(url=config["url"].removeprefix("http://"))
    key = {"Authorization": f"Bearer {config['key']}"}
    several = config["several"]
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in several["inputs"].items()}
    results: dict[str, Any] = {}

    def infer(ask: list[tuple[str, bool]] | None) -> dict[str, Any]:
        tensors = []
        for i, (name, x) in enumerate(reversed(arrays.items())):
            tensor = triton.InferInput(name, list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=i == 0)
            tensors.append(tensor)
        outputs = None
        if ask is not None:
            outputs = [triton.InferRequestedOutput(n, binary_data=b) for n, b in ask]
        answer = client.infer(several["model"], tensors, outputs=outputs, headers=dict(key))
        names = [output["name"] for output in answer.get_response()["outputs"]]
        return {"order": names, **{n: answer.as_numpy(n).tolist() for n in names}}

    attempt(results, "metadata", lambda: client.get_model_metadata(several["model"], headers=key))
    attempt(results, "infer_all", lambda: infer(None))
    attempt(results, "infer_asked", lambda: infer([("scaled", True), ("logits", False)]))
    client.close()
    return results


async def several_with_kserve(config: dict[str, Any]) -> dict[str, Any]:
    url, several = config["url"], config["several"]
    key = {"Authorization": f"Bearer {config['key']}"}
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
    results: dict[str, Any] = {}
    try:
        tensors = []
        for name, values in several["inputs"].items():
            x = np.asarray(values, dtype=np.float32)
            tensor = InferInput(name=name, shape=list(x.shape), datatype="FP32")
            tensor.set_data_from_numpy(x, binary_data=name == "b")
            tensors.append(tensor)
        request = InferRequest(model_name=several["model"], infer_inputs=tensors)
        answer = await client.infer(url, request, model_name=several["model"], headers=key)
        results["infer"] = {output.name: output.as_numpy().tolist() for output in answer.outputs}
    except Exception as exc:
        results["infer"] = {"raised": type(exc).__name__, "message": str(exc)}
    await client.close()
    return results


def image_with_tritonclient(config: dict[str, Any]) -> dict[str, Any]:
    """An image model fed a BYTES tensor of encoded images, as Triton's image clients do."""
    client = triton.InferenceServerClient(url=config["url"].removeprefix("http://"))
    key = {"Authorization": f"Bearer {config['key']}"}
    image = config["image"]
    files = np.array([base64.b64decode(f) for f in image["files"]], dtype=np.object_)
    results: dict[str, Any] = {}

    def infer() -> list[Any]:
        tensor = triton.InferInput(image["input"], [len(files)], "BYTES")
        tensor.set_data_from_numpy(files, binary_data=True)
        answer = client.infer(image["model"], [tensor], headers=dict(key))
        return answer.as_numpy(image["output"]).tolist()

    attempt(results, "infer", infer)
    client.close()
    return results


def main() -> None:
    config = json.load(sys.stdin)
    results = {
        "tritonclient": with_tritonclient(config),
        "kserve": asyncio.run(with_kserve(config)),
        "several_tritonclient": several_with_tritonclient(config),
        "several_kserve": asyncio.run(several_with_kserve(config)),
        "image_tritonclient": image_with_tritonclient(config),
    }
    json.dump(results, sys.stdout, default=str)


if __name__ == "__main__":
    main()
