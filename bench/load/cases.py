"""What a request carries, its body, and the substring every answer to it must hold."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parents[1]
ROOT = BENCH.parent
STORE = ROOT / "model_store"
RESULTS = BENCH / "results"
PY = sys.executable
BIN = Path(PY).parent
ATOL = 1e-4


@dataclass(frozen=True)
class Case:
    model: str
    samples: int  # per request
    protocol: str = "predict"  # or "v2bin": KServe V2 infer, binary tensors in and out

    @property
    def key(self) -> str:
        prefix = "" if self.protocol == "predict" else f"{self.protocol}-"
        return f"{prefix}{self.model.removeprefix('digits-')}x{self.samples}"

    def path(self) -> str:
        if self.protocol == "v2bin":
            return f"/v2/models/{self.model}/infer"
        return f"/models/{self.model}/predict"


@dataclass(frozen=True)
class Payload:
    """A request body ready to send, and how to recognise a right answer to it."""

    body: bytes
    expect: str  # substring of every right answer
    header_length: int | None = None  # V2 binary: the JSON header's length

    @property
    def content_type(self) -> str:
        return "application/json" if self.header_length is None else "application/octet-stream"


def manifest(model: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((STORE / model / "1" / "manifest.json").read_text())
    return data


def payload(case: Case) -> Payload:
    """The manifest's golden inputs, repeated to ``case.samples`` rows."""
    m = manifest(case.model)
    golden_in, golden_out = m["golden"]["inputs"], np.asarray(m["golden"]["outputs"])
    rows = [golden_in[i % len(golden_in)] for i in range(case.samples)]
    if case.protocol == "v2bin":
        return v2_binary_payload(m, np.asarray(rows, dtype="<f4"))
    labels = [
        m["labels"][int(np.argmax(golden_out[i % len(golden_in)]))] for i in range(case.samples)
    ]
    body = json.dumps({"inputs": rows}, separators=(",", ":")).encode()
    return Payload(body, '"predictions":[' + ",".join(f'"{x}"' for x in labels) + "]")


def v2_binary_payload(m: dict[str, Any], x: np.ndarray) -> Payload:
    """A KServe V2 binary request as tritonclient sends it: JSON header, then raw float32.

    The answer's outputs are raw bytes too, so load runs check only the status and the output's
    size in the answer's JSON header; ``checks.v2_golden`` decodes a whole answer before each run.
    """
    spec, out = m["inputs"][0], m["outputs"][0]
    x = x.reshape(len(x), *spec["shape"])
    tensor = {
        "name": spec["name"],
        "shape": list(x.shape),
        "datatype": "FP32",
        "parameters": {"binary_data_size": x.nbytes},
    }
    header = {"inputs": [tensor], "parameters": {"binary_data_output": True}}
    head = json.dumps(header, separators=(",", ":")).encode()
    out_bytes = len(x) * int(np.prod(out["shape"])) * 4
    return Payload(head + x.tobytes(), f'"binary_data_size":{out_bytes}', len(head))


def bare_expectation() -> str:
    """The bare endpoint answers digits-mlp's first golden sample, whatever it is sent."""
    m = manifest("digits-mlp")
    label = m["labels"][int(np.argmax(m["golden"]["outputs"][0]))]
    return f'"predictions":["{label}"]'
