"""Every server's answers checked against the manifests' golden outputs before a load run."""

from __future__ import annotations

import json
import urllib.request

import numpy as np

from load.cases import ATOL, Case, Payload, manifest
from load.process import Running, http


def golden(run: Running, model: str) -> float | None:
    """Max |answer - golden| over the manifest's golden inputs; raises when it exceeds ATOL."""
    if not run.server.checks_outputs:
        return None
    m = manifest(model)
    body = json.dumps({"inputs": m["golden"]["inputs"]}).encode()
    status, answer = http("POST", f"{run.base}/models/{model}/predict", body, timeout=30)
    if status != 200:
        raise RuntimeError(
            f"{run.server.name} {model}: golden request got {status}: {answer[:200]!r}"
        )
    got = np.asarray(json.loads(answer)["outputs"], dtype=np.float64)
    diff = float(np.abs(got - np.asarray(m["golden"]["outputs"])).max())
    if diff > ATOL:
        raise RuntimeError(
            f"{run.server.name} {model}: golden outputs differ by {diff:.3g} > {ATOL}"
        )
    return diff


def v2_golden(url: str, p: Payload, case: Case) -> None:
    """Send the binary V2 body once and compare the decoded raw outputs with the golden ones."""
    got = v2_answer(url, p)
    want = np.asarray(manifest(case.model)["golden"]["outputs"])
    want = want[np.arange(case.samples) % len(want)]
    diff = float(np.abs(got - want).max())
    if diff > ATOL:
        raise RuntimeError(f"{case.key}: V2 binary outputs differ from golden by {diff:.3g}")


def v2_answer(url: str, p: Payload, timeout: float = 60) -> np.ndarray:
    """The one output of a binary V2 answer to ``p``, decoded to its shape."""
    assert p.header_length is not None
    headers = {
        "Content-Type": p.content_type,
        "Inference-Header-Content-Length": str(p.header_length),
    }
    req = urllib.request.Request(url, data=p.body, method="POST", headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        length = int(resp.headers["Inference-Header-Content-Length"])
        answer = resp.read()
    (output,) = json.loads(answer[:length])["outputs"]
    return np.frombuffer(answer[length:], dtype="<f4").reshape(output["shape"])
