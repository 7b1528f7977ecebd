"""Real gRPC clients, unmodified, against the production server on loopback: tritonclient's gRPC
client (sync and asyncio: health, metadata, config, inference with raw tensors, several inputs
and outputs, refusals) and the KServe SDK's InferenceGRPCClient, through the key. They run in the
clients' own environment (tests/service/test_real_clients.py makes it)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import running
from tests.service.pair_model import add_pair_version, pair_inputs, pair_reference
from tests.service.test_real_clients import HERE, clients_python, close

KEY, MANAGEMENT_KEY = "grpc-key-1", "grpc-manage-2"
ROOT = Path(__file__).resolve().parents[2]


def test_tritonclient_grpc_and_the_kserve_grpc_client_work_unchanged(tmp_path: Path) -> None:
    python = clients_python()
    store = tmp_path / "store"
    shutil.copytree(ROOT / "model_store", store)
    add_pair_version(store)
    manifest = json.loads((store / "digits-mlp" / "1" / "manifest.json").read_text())
    x = np.asarray(manifest["golden"]["inputs"][:3], dtype=np.float32)
    expected = np.asarray(manifest["golden"]["outputs"][:3], dtype=np.float32)
    pair = pair_inputs(2, seed=4)
    settings = Settings(
        model_store=store,
        api_key=KEY,
        grpc=True,
        grpc_port=0,
        management_api=True,
        management_api_key=MANAGEMENT_KEY,
    )
    app = create_app(settings)
    with running(app, key=KEY):
        assert app.grpc is not None
        config = {
            "address": f"127.0.0.1:{app.grpc.port}",
            "key": KEY,
            "management_key": MANAGEMENT_KEY,
            "model": "digits-mlp",
            "inputs": x.tolist(),
            "several": {"model": "pair", "inputs": {k: v.tolist() for k, v in pair.items()}},
        }
        results: dict[str, Any] = {}
        for client in ("tritonclient", "kserve"):  # one per process: see the runner's NOTE
            done = subprocess.run(
                [str(python), str(HERE / "run_grpc_clients.py"), client],
                input=json.dumps(config),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr[-3000:]
            results |= json.loads(done.stdout)

    triton = results["tritonclient"]
    for name in ("is_server_live", "is_server_ready", "is_model_ready"):
        assert triton[name] is True, (name, triton[name])
    assert triton["is_model_ready_unknown"] is False
    assert {"binary_tensor_data", "statistics"} <= set(triton["server_metadata"]["extensions"])
    metadata = triton["model_metadata"]
    assert metadata["name"] == "digits-mlp" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}]
    config_answer = triton["model_config"]["config"]
    assert config_answer["input"][0]["data_type"] == "TYPE_FP32"
    assert config_answer["max_batch_size"] >= 64
    for name in ("infer", "infer_version"):
        close(triton[name], expected)
    assert triton["infer_without_key"]["status"] == "StatusCode.UNAUTHENTICATED"
    assert "api_key" in triton["infer_without_key"]["message"]
    assert triton["infer_unknown_version"]["status"] == "StatusCode.NOT_FOUND"

    streamed = triton["stream"]
    assert sorted(streamed["answers"]) == ["s-0", "s-1", "s-2", "s-4", "s-5"]
    for i in (0, 1, 2, 4, 5):
        close(streamed["answers"][f"s-{i}"], expected[i % 3 : i % 3 + 1])
    assert len(streamed["errors"]) == 1 and "'nope' not found" in streamed["errors"][0]
    (stat,) = triton["statistics"]["model_stats"]
    assert stat["name"] == "digits-mlp" and int(stat["inference_count"]) >= 3 * len(x)
    assert int(stat["inference_stats"]["success"]["count"]) >= 3
    assert {"name": "digits-mlp", "version": "1", "state": "READY"}.items() <= next(
        m for m in triton["index"]["models"] if m["name"] == "digits-mlp"
    ).items()
    assert triton["index_without_key"]["status"] == "StatusCode.UNAUTHENTICATED"
    assert triton["unload"] is None and triton["load"] is None
    assert triton["ready_after_unload"] is False
    close(triton["infer_after_load"], expected)

    several = results["several_tritonclient"]
    assert several["infer_all"]["order"] == ["logits", "scaled"]
    assert several["infer_asked"]["order"] == ["scaled", "logits"]
    reference = pair_reference(pair)
    for call in ("infer_all", "infer_asked"):
        for name in ("logits", "scaled"):
            close(several[call][name], reference[name])

    aio = results["tritonclient_aio"]
    assert aio["is_server_ready"] is True
    close(aio["infer"], expected)
    close(aio["infer_8_at_once"], expected)

    kserve = results["kserve"]
    for name in ("is_server_live", "is_server_ready", "is_model_ready"):
        assert kserve[name] is True, (name, kserve[name])
    close(kserve["infer"], expected)
