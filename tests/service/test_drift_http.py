"""Drift through a real server: the shipped digits-mlp fed held-out digits, then shifted ones."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from foldserve.demos.data import load_dataset
from service.app import create_app
from service.drift import DEFAULT_THRESHOLD, FOLD_EVERY_S, NO_INPUT_BN
from service.schemas import DriftAnswer
from service.settings import Settings
from tests.service.conftest import Artifacts, add_version, serve


def send(base: str, rows: np.ndarray, per_request: int = 9) -> None:
    with httpx.Client(base_url=base, timeout=30) as client:
        for start in range(0, len(rows), per_request):
            batch = rows[start : start + per_request]
            answer = client.post("/models/digits-mlp/predict", json={"inputs": batch.tolist()})
            assert answer.status_code == 200, answer.text


def drift(base: str, name: str = "digits-mlp", **params: Any) -> httpx.Response:
    """The answer once the fold thread has folded every row sent (a cheap model's monitor takes
    them all): a read answers as of the last fold, at most FOLD_EVERY_S after a request."""
    deadline = time.monotonic() + 10
    while True:
        answer = httpx.get(f"{base}/models/{name}/drift", params=params, timeout=10)
        if answer.status_code != 200:
            return answer
        DriftAnswer.model_validate_json(answer.content)  # what /openapi.json documents
        body = answer.json()
        folded = [body, *body["hidden"]] if body["available"] else body["hidden"]
        if all(layer["samples_folded"] == body["samples_observed"] for layer in folded):
            return answer
        assert time.monotonic() < deadline, body
        time.sleep(FOLD_EVERY_S)


def gauge(base: str, metric: str, layer: str | None = None) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    labels = 'model="digits-mlp",version="1"'  # the client sorts labels by name
    labels = labels if layer is None else f'layer="{layer}",{labels}'
    found = re.search(rf"^{metric}\{{{labels}\}} (\S+)$", text, re.M)
    assert found is not None, text
    return float(found.group(1))


def test_drift_of_the_shipped_model_over_http(shipped_store: Path, artifacts: Artifacts) -> None:
    add_version(shipped_store, artifacts)  # "tiny": no BatchNorm on its input
    held_out = load_dataset("digits", (64,)).x_test.astype(np.float32)
    settings = Settings(model_store=shipped_store, default_model="digits-mlp")
    with serve(create_app(settings)) as base:
        before = drift(base).json()
        assert before["available"] and before["samples"] == 0 and before["score"] is None
        assert before["monitored"] == ["input_norm", "body.1"]
        assert before["threshold"] == DEFAULT_THRESHOLD
        (hidden,) = before["hidden"]  # the first hidden BN: an affine map of the input
        assert (hidden["layer"], hidden["map"], hidden["score"]) == ("body.1", "linear", None)
        assert len(hidden["features"]) == 128

        send(base, held_out)
        calm = drift(base).json()
        assert calm["samples"] > 400 and not calm["drifted"]
        assert calm["score"] < DEFAULT_THRESHOLD
        assert gauge(base, "foldserve_input_drift_score") == calm["score"]
        assert gauge(base, "foldserve_input_drift_samples") == calm["samples"]
        (hidden,) = calm["hidden"]
        assert hidden["score"] < DEFAULT_THRESHOLD and not hidden["drifted"]
        assert hidden["samples"] == pytest.approx(calm["samples"])  # each its own, same rows
        assert gauge(base, "foldserve_hidden_drift_score", "body.1") == hidden["score"]
        assert gauge(base, "foldserve_hidden_drift_samples", "body.1") == hidden["samples"]
        feature = calm["features"][20]
        assert feature["index"] == 20 and feature["name"] is None
        assert set(feature) >= {"live_mean", "ref_mean", "mean_shift", "live_var", "ref_var"}

        send(base, held_out * 1.5 + 1.0)  # another scanner: brighter, black level 1
        moved = drift(base, version=1).json()
        assert moved["drifted"] and moved["score"] > 2 * DEFAULT_THRESHOLD
        assert gauge(base, "foldserve_input_drift_score") > DEFAULT_THRESHOLD
        assert moved["hidden"][0]["drifted"] and moved["hidden"][0]["score"] > DEFAULT_THRESHOLD

        send(base, np.full((1, 64), 1e30, dtype=np.float32))  # issue 17: it poisoned the sums
        huge = drift(base).json()
        assert huge["score"] > moved["score"] and huge["drifted"]  # finite, and drifted
        assert huge["hidden"][0]["score"] > moved["hidden"][0]["score"]
        assert huge["resets"] == 0 and huge["last_reset"] is None
        assert gauge(base, "foldserve_input_drift_score") == huge["score"]
        assert huge["cpu_budget"] > 0 and huge["samples_observed"] == 2 * len(held_out) + 1

        plain = drift(base, "tiny")
        assert plain.status_code == 200
        assert plain.json()["available"] is False and plain.json()["reason"] == NO_INPUT_BN
        assert 'drift_score{model="tiny"' not in httpx.get(f"{base}/metrics").text
        assert drift(base, "nope").status_code == 404
        assert drift(base, version=7).status_code == 404
        cnn = drift(base, "digits-cnn").json()
        assert cnn["axis"] == "channel" and cnn["monitored"] == ["input_norm", "stem.1"]
        assert plain.json()["hidden"] == [] and plain.json()["monitored"] == []
