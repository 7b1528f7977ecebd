"""Drive a running foldserve's gRPC service with the real clients, unmodified: tritonclient's gRPC
client (sync and asyncio) and the KServe Python SDK's InferenceGRPCClient. Run by
tests/service/test_real_grpc_clients.py with the clients' own python.

Reads the gRPC address, the key and inputs as JSON on stdin; prints what each call returned as
JSON on stdout. An exception a client raises is reported, not hidden: its text is the result.

NOTE: one client per process (the first argument: tritonclient or kserve): both register the
protocol's messages under the same names in protobuf's default pool, and the second to load
fails ("duplicate symbol 'inference.ServerLiveRequest'").
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from google.protobuf.json_format import MessageToDict
from tritonclient.utils import InferenceServerException


def failure(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, InferenceServerException):
        return {"raised": type(exc).__name__, "status": exc.status(), "message": exc.message()}
    return {"raised": type(exc).__name__, "message": str(exc), "trace": traceback.format_exc()}


def attempt(results: dict[str, Any], name: str, call: Callable[[], Any]) -> None:
    try:
        results[name] = call()
    except Exception as exc:
        results[name] = failure(exc)


async def attempt_async(
    results: dict[str, Any], name: str, call: Callable[[], Awaitable[Any]]
) -> None:
    try:
        results[name] = await call()
    except Exception as exc:
        results[name] = failure(exc)


def as_dict(message: Any) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def with_tritonclient(config: dict[str, Any]) -> dict[str, Any]:
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(url=config["address"])
    key = {"authorization": f"Bearer {config['key']}"}
    model = config["model"]
    x = np.asarray(config["inputs"], dtype=np.float32)
    results: dict[str, Any] = {}

    def infer(headers: dict[str, str] | None = key, version: str = "") -> list[Any]:
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        wanted = triton.InferRequestedOutput("logits")
        answer = client.infer(
            model,
            [tensor],
            model_version=version,
            outputs=[wanted],
            headers=headers,
            request_id="g-1",
        )
        response = answer.get_response()
        assert response.id == "g-1" and response.model_version == "1", response
        return answer.as_numpy("logits").tolist()

    attempt(results, "is_server_live", lambda: client.is_server_live())
    attempt(results, "is_server_ready", lambda: client.is_server_ready())
    attempt(results, "is_model_ready", lambda: client.is_model_ready(model, headers=key))
    attempt(results, "is_model_ready_unknown", lambda: client.is_model_ready("nope", headers=key))
    attempt(results, "server_metadata", lambda: as_dict(client.get_server_metadata(headers=key)))
    attempt(
        results,
        "model_metadata",
        lambda: as_dict(client.get_model_metadata(model, headers=key)),
    )
    attempt(results, "model_config", lambda: as_dict(client.get_model_config(model, headers=key)))
    attempt(results, "infer", lambda: infer())
    attempt(results, "infer_version", lambda: infer(version="1"))
    attempt(results, "infer_without_key", lambda: infer(headers=None))
    attempt(results, "infer_unknown_version", lambda: infer(version="7"))
    attempt(results, "stream", lambda: stream(client, config, key))
    attempt(
        results,
        "statistics",
        lambda: as_dict(client.get_inference_statistics(model, "1", headers=key)),
    )
    manage = {"authorization": f"Bearer {config['management_key']}"}
    attempt(results, "index", lambda: as_dict(client.get_model_repository_index(headers=manage)))
    attempt(results, "index_without_key", lambda: client.get_model_repository_index())
    attempt(results, "unload", lambda: client.unload_model(model, headers=manage))
    attempt(results, "ready_after_unload", lambda: client.is_model_ready(model, headers=key))
    attempt(results, "load", lambda: client.load_model(model, headers=manage))
    attempt(results, "infer_after_load", lambda: infer())
    client.close()
    return results


def stream(client: Any, config: dict[str, Any], key: dict[str, str]) -> dict[str, Any]:
    """tritonclient's stream API: six requests and one for a model that is not there, on one
    stream; each answer (or error) as the callback gets it."""
    import queue

    import tritonclient.grpc as triton

    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)), headers=key)
    x = np.asarray(config["inputs"], dtype=np.float32)
    for i in range(6):
        tensor = triton.InferInput("input", [1, x.shape[1]], "FP32")
        tensor.set_data_from_numpy(x[i % len(x) : i % len(x) + 1])
        model = "nope" if i == 3 else config["model"]
        client.async_stream_infer(model, [tensor], request_id=f"s-{i}")
    answers: dict[str, Any] = {}
    errors: list[str] = []
    for _ in range(6):
        result, error = got.get(timeout=30)
        if error is not None:
            errors.append(str(error))
        else:
            answers[result.get_response().id] = result.as_numpy("logits").tolist()
    client.stop_stream()
    return {"answers": answers, "errors": errors}


def several_with_tritonclient(config: dict[str, Any]) -> dict[str, Any]:
    """A model of several inputs and outputs: inputs in the reverse of the model's order,
    outputs asked for in another order than the model's."""
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(url=config["address"])
    key = {"authorization": f"Bearer {config['key']}"}
    several = config["several"]
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in several["inputs"].items()}
    results: dict[str, Any] = {}

    def infer(ask: list[str] | None) -> dict[str, Any]:
        tensors = []
        for name, x in reversed(arrays.items()):
            tensor = triton.InferInput(name, list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            tensors.append(tensor)
        outputs = None if ask is None else [triton.InferRequestedOutput(n) for n in ask]
        answer = client.infer(several["model"], tensors, outputs=outputs, headers=key)
        names = [output.name for output in answer.get_response().outputs]
        return {"order": names, **{n: answer.as_numpy(n).tolist() for n in names}}

    attempt(results, "infer_all", lambda: infer(None))
    attempt(results, "infer_asked", lambda: infer(["scaled", "logits"]))
    client.close()
    return results


async def with_tritonclient_aio(config: dict[str, Any]) -> dict[str, Any]:
    import tritonclient.grpc.aio as triton_aio

    client = triton_aio.InferenceServerClient(url=config["address"])
    key = {"authorization": f"Bearer {config['key']}"}
    x = np.asarray(config["inputs"], dtype=np.float32)
    results: dict[str, Any] = {}

    async def infer() -> list[Any]:
        tensor = triton_aio.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        answer = await client.infer(config["model"], [tensor], headers=key)
        return answer.as_numpy("logits").tolist()

    async def several_at_once() -> list[Any]:
        answers = await asyncio.gather(*(infer() for _ in range(8)))
        return answers[-1]

    await attempt_async(results, "is_server_ready", lambda: client.is_server_ready())
    await attempt_async(results, "infer", infer)
    await attempt_async(results, "infer_8_at_once", several_at_once)
    await client.close()
    return results


async def with_kserve(config: dict[str, Any]) -> dict[str, Any]:
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    client = InferenceGRPCClient(url=config["address"], timeout=30)
    key = (("authorization", f"Bearer {config['key']}"),)
    model = config["model"]
    x = np.asarray(config["inputs"], dtype=np.float32)
    results: dict[str, Any] = {}

    async def infer() -> list[Any]:
        tensor = InferInput(name="input", shape=list(x.shape), datatype="FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        request = InferRequest(model_name=model, infer_inputs=[tensor], request_id="k-1")
        answer = await client.infer(request, headers=key)
        assert answer.id == "k-1" and answer.model_name == model, answer
        (output,) = answer.outputs
        assert output.name == "logits" and output.datatype == "FP32", output
        return output.as_numpy().tolist()

    await attempt_async(results, "is_server_live", lambda: client.is_server_live())
    await attempt_async(results, "is_server_ready", lambda: client.is_server_ready())
    await attempt_async(
        results, "is_model_ready", lambda: client.is_model_ready(model, headers=key)
    )
    await attempt_async(results, "infer", infer)
    await client.close()
    return results


def main() -> None:
    config = json.load(sys.stdin)
    if sys.argv[1] == "tritonclient":
        results = {
            "tritonclient": with_tritonclient(config),
            "several_tritonclient": several_with_tritonclient(config),
            "tritonclient_aio": asyncio.run(with_tritonclient_aio(config)),
        }
    else:
        results = {"kserve": asyncio.run(with_kserve(config))}
    json.dump(results, sys.stdout, default=str)


if __name__ == "__main__":
    main()
