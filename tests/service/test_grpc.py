"""The gRPC service on the production server (loopback, a port the OS picks), called with
grpcio and the protocol's own messages: the same answers, refusals and figures as REST."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from service.app import create_app
from service.rpc import health_pb2
from service.rpc import inference_pb2 as pb
from service.settings import Settings
from tests.service.conftest import running, serve

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = json.loads((ROOT / "model_store" / "digits-mlp" / "1" / "manifest.json").read_text())
GOLDEN_IN = np.asarray(MANIFEST["golden"]["inputs"], dtype=np.float32)
GOLDEN_OUT = np.asarray(MANIFEST["golden"]["outputs"], dtype=np.float32)


SERVICE = "inference.GRPCInferenceService"


class Client:
    """Calls by method name, as any generated stub would make them."""

    def __init__(self, channel: grpc.Channel, base: str) -> None:
        self.channel = channel
        self.base = base

    def __call__(
        self, method: str, request: Any, answer: type[Any], service: str = SERVICE, **options: Any
    ) -> Any:
        call = self.channel.unary_unary(
            f"/{service}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=answer.FromString,
        )
        return call(request, **options)

    def infer(self, request: pb.ModelInferRequest, **options: Any) -> pb.ModelInferResponse:
        return self("ModelInfer", request, pb.ModelInferResponse, **options)

    def health(self, service: str = "") -> int:
        answer = self(
            "Check",
            health_pb2.HealthCheckRequest(service=service),
            health_pb2.HealthCheckResponse,
            service="grpc.health.v1.Health",
        )
        status: int = answer.status
        return status


def raw_request(x: np.ndarray, model: str = "digits-mlp", **fields: Any) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, **fields)
    request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    return request


def outputs(answer: pb.ModelInferResponse) -> np.ndarray:
    (tensor,) = answer.outputs
    return np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(tuple(tensor.shape))


def refused(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error: grpc.RpcError = caught.value
    return error


@pytest.fixture
def client(shipped_store: Path) -> Iterator[Client]:
    with _client(Settings(model_store=shipped_store, grpc=True, grpc_port=0)) as made:
        yield made


@contextlib.contextmanager
def _client(settings: Settings) -> Iterator[Client]:
    app = create_app(settings)
    with running(app, key=settings.api_key) as (base, _):
        assert app.grpc is not None and app.grpc.port
        with grpc.insecure_channel(f"127.0.0.1:{app.grpc.port}") as channel:
            yield Client(channel, base)


def test_raw_tensors_give_the_golden_outputs_bit_for_bit_as_rest(client: Client) -> None:
    answer = client.infer(raw_request(GOLDEN_IN, id="req-7"))
    assert (answer.model_name, answer.model_version, answer.id) == ("digits-mlp", "1", "req-7")
    assert answer.outputs[0].name == "logits" and answer.outputs[0].datatype == "FP32"
    got = outputs(answer)
    np.testing.assert_allclose(got, GOLDEN_OUT, rtol=1e-4, atol=1e-4)
    rest = httpx.post(f"{client.base}/predict", json={"inputs": GOLDEN_IN.tolist()}).json()
    np.testing.assert_array_equal(got, np.asarray(rest["outputs"], dtype=np.float32))


def test_typed_contents_give_the_same_outputs_as_raw(client: Client) -> None:
    request = pb.ModelInferRequest(model_name="digits-mlp", model_version="1")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=GOLDEN_IN.shape)
    tensor.contents.fp32_contents.extend(GOLDEN_IN.reshape(-1).tolist())
    typed = outputs(client.infer(request))
    np.testing.assert_array_equal(typed, outputs(client.infer(raw_request(GOLDEN_IN))))
    # Integers in their own list, cast as REST casts them.
    ints = pb.ModelInferRequest(model_name="digits-mlp")
    tensor = ints.inputs.add(name="input", datatype="INT64", shape=[1, 64])
    tensor.contents.int64_contents.extend(np.rint(GOLDEN_IN[0]).astype(int).tolist())
    as_floats = raw_request(np.rint(GOLDEN_IN[:1]))
    np.testing.assert_array_equal(outputs(client.infer(ints)), outputs(client.infer(as_floats)))


@pytest.mark.parametrize(
    ("change", "code", "says"),
    [
        (lambda r: r.inputs[0].shape.__setitem__(1, 63), "INVALID_ARGUMENT", "shape must be"),
        (lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 12), "INVALID_ARGUMENT", "bytes"),
        (lambda r: setattr(r.inputs[0], "name", "x"), "INVALID_ARGUMENT", "'input'"),
        (lambda r: setattr(r.inputs[0], "datatype", "BYTES"), "INVALID_ARGUMENT", "datatype"),
        (lambda r: setattr(r, "model_name", "nope"), "NOT_FOUND", "'nope' not found"),
        (lambda r: setattr(r, "model_version", "9"), "NOT_FOUND", "version"),
        (lambda r: setattr(r, "model_version", "v1"), "NOT_FOUND", "numbered"),
        (lambda r: r.outputs.add(name="probs"), "INVALID_ARGUMENT", "'logits'"),
        (
            lambda r: r.parameters["timeout"].CopyFrom(pb.InferParameter(string_param="1")),
            "INVALID_ARGUMENT",
            "timeout",
        ),
    ],
)
def test_bad_requests_are_refused_with_the_code_and_the_reason(
    client: Client, change: Any, code: str, says: str
) -> None:
    request = raw_request(GOLDEN_IN[:2])
    change(request)
    error = refused(lambda: client.infer(request))
    assert error.code() == getattr(grpc.StatusCode, code), error.details()
    assert says in (error.details() or "")


def test_a_message_that_is_no_infer_request_is_refused(client: Client) -> None:
    call = client.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    error = refused(lambda: call(b"\xff\xff\xff"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ModelInferRequest" in (error.details() or "")


def test_a_message_over_max_body_bytes_is_refused_before_it_is_read(shipped_store: Path) -> None:
    settings = Settings(model_store=shipped_store, grpc=True, grpc_port=0, max_body_bytes=4096)
    with _client(settings) as client:
        assert outputs(client.infer(raw_request(GOLDEN_IN[:2]))).shape == (2, 10)  # 512 bytes
        error = refused(lambda: client.infer(raw_request(np.zeros((64, 64), np.float32))))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_keys_guard_all_but_health_and_the_request_id_comes_back(shipped_store: Path) -> None:
    settings = Settings(model_store=shipped_store, grpc=True, grpc_port=0, api_key="k3y")
    with _client(settings) as client:
        error = refused(lambda: client.infer(raw_request(GOLDEN_IN[:1])))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "api_key" in (error.details() or "")
        wrong = refused(
            lambda: client.infer(raw_request(GOLDEN_IN[:1]), metadata=[("x-api-key", "no")])
        )
        assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
        for metadata in ([("authorization", "Bearer k3y")], [("x-api-key", "k3y")]):
            client.infer(raw_request(GOLDEN_IN[:1]), metadata=metadata)
        metadata_error = refused(
            lambda: client(
                "ModelMetadata",
                pb.ModelMetadataRequest(name="digits-mlp"),
                pb.ModelMetadataResponse,
            )
        )
        assert metadata_error.code() == grpc.StatusCode.UNAUTHENTICATED
        # Open: liveness, readiness, health checking (Kubernetes' probes send no key).
        assert client("ServerLive", pb.ServerLiveRequest(), pb.ServerLiveResponse).live
        assert client("ServerReady", pb.ServerReadyRequest(), pb.ServerReadyResponse).ready
        assert client.health() == health_pb2.HealthCheckResponse.SERVING
        # The request id: the client's when valid, else a new one, with the status.
        call = client.channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        keyed = [("x-api-key", "k3y")]
        _, given = call.with_call(
            raw_request(GOLDEN_IN[:1]), metadata=[*keyed, ("x-request-id", "abc-1")]
        )
        _, made = call.with_call(raw_request(GOLDEN_IN[:1]), metadata=keyed)
        assert dict(given.trailing_metadata())["x-request-id"] == "abc-1"
        assert dict(made.trailing_metadata())["x-request-id"] not in ("", "abc-1")


def test_metadata_config_and_readiness_are_the_rest_documents(client: Client) -> None:
    server = client("ServerMetadata", pb.ServerMetadataRequest(), pb.ServerMetadataResponse)
    rest = httpx.get(f"{client.base}/v2").json()
    assert (server.name, server.version, list(server.extensions)) == (
        rest["name"], rest["version"], rest["extensions"],
    )  # fmt: skip
    meta = client(
        "ModelMetadata", pb.ModelMetadataRequest(name="digits-mlp"), pb.ModelMetadataResponse
    )
    rest = httpx.get(f"{client.base}/v2/models/digits-mlp").json()
    assert meta.platform == rest["platform"] and list(meta.versions) == rest["versions"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        (t["name"], t["datatype"], t["shape"]) for t in rest["inputs"]
    ]
    config = client(
        "ModelConfig", pb.ModelConfigRequest(name="digits-mlp"), pb.ModelConfigResponse
    ).config
    rest = httpx.get(f"{client.base}/v2/models/digits-mlp/config").json()
    assert config.max_batch_size == rest["max_batch_size"]
    assert config.input[0].data_type == pb.TYPE_FP32 and list(config.input[0].dims) == [64]
    assert config.HasField("dynamic_batching")
    ready = client("ModelReady", pb.ModelReadyRequest(name="digits-mlp"), pb.ModelReadyResponse)
    unknown = client("ModelReady", pb.ModelReadyRequest(name="nope"), pb.ModelReadyResponse)
    assert ready.ready and not unknown.ready
    assert client.health("digits-mlp") == health_pb2.HealthCheckResponse.SERVING
    error = refused(lambda: client.health("nope"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_grpc_requests_are_counted_where_rest_ones_are(client: Client) -> None:
    def successes() -> int:
        stats = httpx.get(f"{client.base}/v2/models/digits-mlp/versions/1/stats").json()
        count: int = stats["model_stats"][0]["inference_stats"]["success"]["count"]
        return count

    before = successes()
    for _ in range(3):
        client.infer(raw_request(GOLDEN_IN[:2]))
    refused(lambda: client.infer(raw_request(GOLDEN_IN[:2], model_version="9")))
    for _ in range(2):
        httpx.post(f"{client.base}/predict", json={"inputs": GOLDEN_IN[:1].tolist()})
    assert successes() == before + 5
    # Among them, those over gRPC, by the status of the same error.
    samples = metric_samples(httpx.get(f"{client.base}/metrics").text)
    labels = 'code="200",model="digits-mlp",version="1"'
    assert samples[f"foldserve_grpc_requests_total{{{labels}}}"] == 3
    assert samples[f"foldserve_requests_total{{{labels}}}"] == before + 5
    assert samples['foldserve_grpc_requests_total{code="404",model="",version=""}'] == 1


def metric_samples(text: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_the_grpc_port_closes_with_the_server(shipped_store: Path) -> None:
    app = create_app(Settings(model_store=shipped_store, grpc=True, grpc_port=0))
    with serve(app):
        assert app.grpc is not None
        port = app.grpc.port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
        error = refused(lambda: call(b"", timeout=2))
        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_the_grpc_service_is_off_when_asked(shipped_store: Path) -> None:
    app = create_app(Settings(model_store=shipped_store, grpc=False))
    with serve(app):
        assert app.grpc is None


def test_statistics_are_the_rest_documents(client: Client) -> None:
    client.infer(raw_request(GOLDEN_IN[:3]))
    every = client("ModelStatistics", pb.ModelStatisticsRequest(), pb.ModelStatisticsResponse)
    assert {s.name for s in every.model_stats} == {"digits-mlp", "digits-cnn"}
    one = client(
        "ModelStatistics",
        pb.ModelStatisticsRequest(name="digits-mlp", version="1"),
        pb.ModelStatisticsResponse,
    )
    (stat,) = one.model_stats
    rest = httpx.get(f"{client.base}/v2/models/digits-mlp/versions/1/stats").json()
    (expected,) = rest["model_stats"]
    assert stat.inference_count == expected["inference_count"] == 3
    assert stat.inference_stats.success.count == expected["inference_stats"]["success"]["count"]
    assert stat.inference_stats.compute_infer.ns > 0
    error = refused(
        lambda: client(
            "ModelStatistics", pb.ModelStatisticsRequest(name="nope"), pb.ModelStatisticsResponse
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_the_repository_needs_the_management_api_and_its_key(shipped_store: Path) -> None:
    off = Settings(model_store=shipped_store, grpc=True, grpc_port=0)
    with _client(off) as client:
        error = refused(
            lambda: client(
                "RepositoryIndex", pb.RepositoryIndexRequest(), pb.RepositoryIndexResponse
            )
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND
    on = Settings(
        model_store=shipped_store,
        grpc=True,
        grpc_port=0,
        management_api=True,
        management_api_key="m4n",
    )
    key = [("authorization", "Bearer m4n")]
    with _client(on) as client:
        error = refused(
            lambda: client(
                "RepositoryIndex", pb.RepositoryIndexRequest(), pb.RepositoryIndexResponse
            )
        )
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        index = client(
            "RepositoryIndex", pb.RepositoryIndexRequest(), pb.RepositoryIndexResponse, metadata=key
        )
        assert ("digits-mlp", "1", "READY") in {(m.name, m.version, m.state) for m in index.models}
        unload = pb.RepositoryModelUnloadRequest(model_name="digits-cnn")
        client("RepositoryModelUnload", unload, pb.RepositoryModelUnloadResponse, metadata=key)
        ready = client("ModelReady", pb.ModelReadyRequest(name="digits-cnn"), pb.ModelReadyResponse)
        assert not ready.ready
        unloaded = refused(lambda: client.infer(pb.ModelInferRequest(model_name="digits-cnn")))
        assert unloaded.code() == grpc.StatusCode.NOT_FOUND, unloaded.details()
        override = pb.RepositoryModelLoadRequest(model_name="digits-cnn")
        override.parameters["config"].string_param = "{}"
        error = refused(
            lambda: client(
                "RepositoryModelLoad", override, pb.RepositoryModelLoadResponse, metadata=key
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "config" in error.details()
        load = pb.RepositoryModelLoadRequest(model_name="digits-cnn")
        client("RepositoryModelLoad", load, pb.RepositoryModelLoadResponse, metadata=key)
        ready = client("ModelReady", pb.ModelReadyRequest(name="digits-cnn"), pb.ModelReadyResponse)
        assert ready.ready


def test_a_stream_answers_each_request_by_id_and_its_refusals_alone(client: Client) -> None:
    call = client.channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    sent = [raw_request(GOLDEN_IN[i : i + 1], id=f"s-{i}") for i in range(6)]
    sent.insert(3, raw_request(GOLDEN_IN[:1], model="nope", id="bad"))
    answers = list(call(iter(sent), timeout=30))
    assert len(answers) == 7
    errors = [a.error_message for a in answers if a.error_message]
    assert len(errors) == 1 and "'nope' not found" in errors[0]
    by_id = {a.infer_response.id: a.infer_response for a in answers if not a.error_message}
    assert sorted(by_id) == [f"s-{i}" for i in range(6)]
    for i in range(6):
        np.testing.assert_array_equal(
            outputs(by_id[f"s-{i}"]), outputs(client.infer(raw_request(GOLDEN_IN[i : i + 1])))
        )


def test_health_watch_says_the_status_then_its_changes(client: Client) -> None:
    call = client.channel.unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    stream = call(health_pb2.HealthCheckRequest(service="digits-mlp"), timeout=10)
    assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
    stream.cancel()
    unknown = call(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    unknown.cancel()


def test_a_drain_answers_every_accepted_call_then_refuses_new_ones(shipped_store: Path) -> None:
    # Every request waits 1.5 s for batch mates: all 16 are surely in flight at the stop.
    settings = Settings(
        model_store=shipped_store,
        grpc=True,
        grpc_port=0,
        max_delay_ms=1500,
        adaptive_delay=False,
    )
    app = create_app(settings)
    with running(app) as (_, server):
        assert app.grpc is not None
        with grpc.insecure_channel(f"127.0.0.1:{app.grpc.port}") as channel:
            call = channel.unary_unary(
                f"/{SERVICE}/ModelInfer",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            pending = [
                call.future(raw_request(GOLDEN_IN[i % 8 : i % 8 + 1]), timeout=30)
                for i in range(16)
            ]
            time.sleep(0.3)
            server.request_stop()
            answers = [future.result() for future in pending]
            later = refused(lambda: call(raw_request(GOLDEN_IN[:1]), timeout=5))
    for i, answer in enumerate(answers):
        np.testing.assert_allclose(outputs(answer)[0], GOLDEN_OUT[i % 8], rtol=1e-4, atol=1e-4)
    assert later.code() == grpc.StatusCode.UNAVAILABLE


def test_the_calls_deadline_is_the_requests_time_budget(shipped_store: Path) -> None:
    # A request waits 1.5 s for batch mates; its call's deadline is 0.3 s: the server itself
    # gives up on it at its deadline (a 504 in its own figures), not only the client.
    settings = Settings(
        model_store=shipped_store,
        grpc=True,
        grpc_port=0,
        max_delay_ms=1500,
        adaptive_delay=False,
    )
    with _client(settings) as client:
        started = time.monotonic()
        error = refused(lambda: client.infer(raw_request(GOLDEN_IN[:1]), timeout=0.3))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 1.0
        deadline = time.monotonic() + 5
        while 'code="504"' not in httpx.get(f"{client.base}/metrics").text:
            assert time.monotonic() < deadline, "the server never counted the request as 504"
            time.sleep(0.05)


def test_a_refusal_to_retry_says_when_in_the_trailing_metadata(shipped_store: Path) -> None:
    # Request bodies in flight may hold 1 MiB: a message of 1.1 MB is refused with UNAVAILABLE
    # and retry-after, as REST answers 503 with Retry-After; a small one is served.
    settings = Settings(
        model_store=shipped_store, grpc=True, grpc_port=0, max_body_memory_bytes=1 << 20
    )
    with _client(settings) as client:
        rows = np.repeat(GOLDEN_IN[:1], 4200, axis=0)
        error = refused(lambda: client.infer(raw_request(rows)))
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert "max_body_memory_bytes" in (error.details() or "")
        assert int(dict(error.trailing_metadata())["retry-after"]) >= 1
        np.testing.assert_allclose(
            outputs(client.infer(raw_request(GOLDEN_IN[:1])))[0], GOLDEN_OUT[0], atol=1e-4
        )
