"""The status page at ``/``: served as static files (open, in no OpenAPI document), and driven in a
real headless chromium over the DevTools protocol against the shipped models: it shows them with
their BN placements, its charts move with traffic, and a digit drawn with the mouse gets the
prediction ``POST /predict`` gives for the 8x8 input the page sent."""

from __future__ import annotations

import json
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.app import create_app
from service.settings import Settings
from tests.service.browser import Browser, Page, find_chromium, launched
from tests.service.conftest import ROOT, SHIPPED_STORE, running, serve

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH: the status page's browser test needs Debian's chromium "
    "(apt-get install chromium; .ci/run installs it when it can)",
)
MODELS = ("digits-cnn", "digits-mlp")
# A 7 as load_digits writes it, with a crossbar: two strokes, in 0..1 of the pad's box.
SEVEN = [[(0.2, 0.1), (0.5, 0.1), (0.8, 0.1), (0.55, 0.5), (0.35, 0.9)], [(0.35, 0.5), (0.75, 0.5)]]
EVERY_MS = 300  # the page's refresh period, shortened (?every_ms=) so the test waits less


def manifest(store: Path, name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((store / name / "1" / "manifest.json").read_text())
    return loaded


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("status-page") / "store"
    shutil.copytree(SHIPPED_STORE, root)
    return root


@pytest.fixture(scope="module")
def base(store: Path) -> Iterator[str]:
    with serve(create_app(Settings(model_store=store, default_model="digits-mlp"))) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM is not None
    with launched(CHROMIUM) as opened:
        yield opened


def send_traffic(base: str, store: Path, rounds: int = 20) -> None:
    """The manifests' golden inputs (real held-out digits), in requests of 1 to 8 rows."""
    with httpx.Client(base_url=base) as client:
        for name in MODELS:
            rows = manifest(store, name)["golden"]["inputs"]
            for i in range(rounds):
                answer = client.post(f"/models/{name}/predict", json={"inputs": rows[: 1 + i % 8]})
                assert answer.status_code == 200, answer.text


def draw(page: Page, strokes: list[list[tuple[float, float]]], *, finger: bool = False) -> None:
    """Draw ``strokes`` on the pad, each answered (predicted) before the next begins."""
    for stroke in strokes:
        done = shown(page, "Number(document.getElementById('predictions').dataset.strokes || 0)")
        (page.touch if finger else page.drag)("#pad", stroke)
        page.wait_for(
            f"Number(document.getElementById('predictions').dataset.strokes) === {done + 1}"
        )


def shown(page: Page, expression: str) -> Any:
    return page.evaluate(expression)


# ---------------------------------------------------------------- plain HTTP: no browser needed


def test_the_page_and_its_assets_are_served_open_and_self_contained(base: str) -> None:
    page = httpx.get(f"{base}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # Nothing from elsewhere: the policy allows this server only, and the page names no URL.
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text
    for asset, kind in [("status.js", "text/javascript"), ("status.css", "text/css")]:
        answer = httpx.get(f"{base}/ui/{asset}")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(kind)
        assert f'"ui/{asset}"' in page.text
    assert httpx.get(f"{base}/ui/..%2Fapp.py").status_code == 404
    assert httpx.get(f"{base}/ui/index.html").status_code == 404  # only the named assets


def test_every_page_file_is_package_data() -> None:
    """The wheel (and so the Docker image, which pip-installs the project) carries the page."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["service"]
    static = ROOT / "service" / "static"
    files = {p.relative_to(static.parent) for p in static.rglob("*") if p.is_file()}
    covered = {f for f in files if any(f.match(pattern) for pattern in patterns)}
    assert files and covered == files


def test_the_bn_report_lists_every_layer_where_the_manifest_put_it(base: str, store: Path) -> None:
    versions = httpx.get(f"{base}/ui/api/batch-norm").json()["versions"]
    assert sorted(v["name"] for v in versions) == sorted(MODELS)
    for version in versions:
        records = manifest(store, version["name"])["batch_norm"]
        assert [(b["name"], b["placement"], b["target"]) for b in version["batch_norm"]] == [
            (b["name"], b["placement"], b["target"]) for b in records
        ]
        assert version["exporter"]["batch_statistics_ops"] == 0


def test_with_a_key_the_page_is_open_and_what_it_reads_is_not(store: Path) -> None:
    app = create_app(Settings(model_store=store, default_model="digits-mlp", api_key="k-1"))
    with serve(app, wait_loaded=False) as url:
        assert httpx.get(f"{url}/").status_code == 200
        assert httpx.get(f"{url}/ui/status.js").status_code == 200
        assert httpx.get(f"{url}/ui/api/batch-norm").status_code == 401
        keyed = httpx.get(f"{url}/ui/api/batch-norm", headers={"Authorization": "Bearer k-1"})
        assert keyed.status_code == 200
        assert not [p for p in app.openapi()["paths"] if p == "/" or p.startswith("/ui")]


# ---------------------------------------------------------------- in a real browser


@needs_chromium
def test_the_page_shows_the_models_live_charts_drift_and_a_drawn_digit(
    browser: Browser, base: str, store: Path
) -> None:
    page = browser.new_page(1280, 1000)
    page.goto(f"{base}/?every_ms={EVERY_MS}")

    # The models, each version serving, with every BN layer where its manifest says it went.
    page.wait_for("document.querySelectorAll('#models .card[data-model]').length === 2")
    for name in MODELS:
        card = f"#models .card[data-model={json.dumps(name)}]"
        rows = shown(
            page,
            f"[...document.querySelectorAll('{card} tr[data-bn]')]"
            ".map(r => [r.dataset.bn, r.dataset.placement])",
        )
        expected = [[b["name"], b["placement"]] for b in manifest(store, name)["batch_norm"]]
        assert rows == expected
        assert shown(page, f"document.querySelector('{card} [data-status]').dataset.status") == (
            "ready"
        )

    # The charts: a point per scrape, and a request rate above zero once traffic comes.
    page.wait_for("Number(document.getElementById('chart-rate').dataset.points) >= 1")
    before = shown(page, "Number(document.getElementById('chart-rate').dataset.points)")
    send_traffic(base, store)
    page.wait_for("Number(document.getElementById('fig-rate').dataset.last) > 0")
    after = shown(page, "Number(document.getElementById('chart-rate').dataset.points)")
    assert after > before
    assert shown(page, "Number(document.getElementById('fig-latency').dataset.last)") > 0
    assert shown(page, "Number(document.getElementById('fig-batch').dataset.last)") >= 1

    # Drift, per model: a verdict with one bar per feature (channel), or "no input BN monitored".
    page.wait_for("document.querySelectorAll('#drift [data-drift]').length === 2")
    for name in MODELS:
        block = f"#drift [data-model={json.dumps(name)}]"
        verdict = shown(page, f"document.querySelector('{block}').dataset.drift")
        if verdict == "off":
            assert "no input BN monitored" in shown(
                page, f"document.querySelector('{block}').textContent"
            )
        else:
            assert verdict in ("ok", "drifted", "collecting")
            bars = shown(page, f"Number(document.querySelector('{block} canvas').dataset.bars)")
            shape = manifest(store, name)["inputs"][0]["shape"]  # [64] or [1, 8, 8]
            assert bars == shape[0]  # one bar pair per feature, or per channel
            # Each monitored hidden BatchNorm too, one bar pair per feature (channel).
            for hidden in manifest(store, name).get("hidden_statistics", []):
                layer = f"{block} canvas[data-layer={json.dumps(hidden['layer'])}]"
                count = shown(page, f"Number(document.querySelector('{layer}').dataset.bars)")
                assert count == len(hidden["mean"])

    # A digit drawn with real mouse events: the label each model shows is what /predict answers
    # for the 8x8 input the page sent.
    draw(page, SEVEN)
    sent = json.loads(shown(page, "document.getElementById('predictions').dataset.input"))
    assert len(sent) == 64 and all(isinstance(v, int) and 0 <= v <= 16 for v in sent)
    assert sum(sent) > 0
    for name in MODELS:
        label = shown(
            page,
            f"document.querySelector('#predictions [data-model={json.dumps(name)}]').dataset.label",
        )
        answer = httpx.post(f"{base}/models/{name}/predict", json={"inputs": [sent]})
        assert label == answer.json()["predictions"][0]

    shown(page, "1")  # reads what the browser sent meanwhile
    assert page.errors() == []


@needs_chromium
def test_a_finger_draws_too(browser: Browser, base: str) -> None:
    page = browser.new_page(400, 800, touch=True)
    page.goto(f"{base}/?every_ms={EVERY_MS}")
    # Everything drawn once (the drift blocks last): the pad stays where the finger lands.
    page.wait_for("document.querySelectorAll('#drift [data-drift]').length === 2")
    draw(page, SEVEN[:1], finger=True)
    shown(page, "1")
    assert page.errors() == []


@needs_chromium
def test_with_a_key_the_page_says_401_and_takes_the_key(browser: Browser, store: Path) -> None:
    app = create_app(Settings(model_store=store, default_model="digits-mlp", api_key="k-1"))
    # Loaded first: a 503 from /readyz while the models load is right, but not what this tests.
    with running(app, key="k-1") as (url, _):
        page = browser.new_page()
        page.goto(f"{url}/?every_ms={EVERY_MS}")
        page.wait_for("document.body.dataset.auth === 'needed'")
        assert shown(page, "document.getElementById('message').hidden") is False
        text = shown(page, "document.getElementById('message').textContent")
        assert "401" in text and "API key" in text

        page.type_into("#key", "k-1")
        shown(page, "document.getElementById('key-form').requestSubmit()")
        page.wait_for("document.querySelectorAll('#models .card[data-model]').length === 2")
        page.wait_for("document.body.dataset.auth === 'ok'")
        assert shown(page, "sessionStorage.getItem('foldserve.apiKey')") == "k-1"
        assert shown(page, "document.getElementById('message').hidden") is True
        shown(page, "1")
        # The browser itself reports each 401 it was answered; nothing else went wrong.
        for error in page.errors():
            assert "status of 401" in error, error
