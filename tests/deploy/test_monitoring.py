"""Prometheus and Grafana: every series the dashboard and the autoscaling rules query exists in a
running server's /metrics, with the labels they group and filter by, so a panel cannot silently
go blank after a metric is renamed. promtool checks the exposition and compose's Prometheus
config where it is installed (Debian's `prometheus` package ships it; .ci/run installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.settings import Settings
from tests.deploy.conftest import DASHBOARD, KUBERNETES, ROOT, STORE, drain_bound_s, yaml_documents
from tests.service.conftest import serve

COMPOSE = ROOT / "docker" / "compose.yaml"
PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus.yml"
PROVISIONING = ROOT / "docker" / "grafana" / "provisioning"
ADAPTER = KUBERNETES / "autoscaling" / "prometheus-adapter-rules.yaml"
ALERTS = ROOT / "deploy" / "prometheus" / "foldserve-alerts.yaml"
PROMETHEUS_MADE = {"up"}  # series Prometheus makes itself for each target
# PromQL's functions, aggregations and keywords that may precede "(" or stand alone; Grafana's
# label_values() is read on its own below.
PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "clamp_min", "clamp_max", "abs", "topk", "bottomk", "vector", "scalar",
}  # fmt: skip


@dataclass
class Query:
    """The series a PromQL expression reads and the labels it relies on."""

    metrics: set[str] = field(default_factory=set)
    labels: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # per metric
    grouping: set[str] = field(default_factory=set)  # by (...) labels: on some metric read


def read_promql(expr: str) -> Query:
    query = Query()
    text = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors: [5m], [$__rate_interval]
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)  # label values, which may hold anything
    for match in re.finditer(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", text):
        query.grouping |= {label.strip() for label in match.group(1).split(",") if label.strip()}
    text = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", text)
    for match in re.finditer(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", text):
        query.metrics.add(match.group(1))
        for matcher in match.group(2).split(","):
            if matcher.strip():
                label = re.match(r"\s*(\w+)\s*(=~|!~|!=|=)", matcher)
                assert label, f"cannot read the matcher {matcher!r} in {expr}"
                query.labels[match.group(1)].add(label.group(1))
    text = re.sub(r"[a-zA-Z_:][\w:]*\s*\{[^}]*\}", " ", text)
    for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if not call and word not in PROMQL_WORDS:
            query.metrics.add(word)
        elif call:
            assert word in PROMQL_WORDS, f"unknown function {word}() in {expr}"
    return query


def dashboard_queries() -> dict[str, str]:
    """Every query of the dashboard, by where it is (panel title or variable)."""
    board = json.loads(DASHBOARD.read_text())
    found = {}
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            found[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for variable in board["templating"]["list"]:
        values = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["query"]["query"])
        assert values, f"variable {variable['name']}: only label_values(metric, label) is read"
        metric, label = values.groups()
        found[f"variable {variable['name']}"] = f"sum by ({label}) ({metric})"
    return found


def alert_queries() -> dict[str, str]:
    rules = yaml.safe_load(ALERTS.read_text())["groups"]
    return {f"alert {r['alert']}": r["expr"] for group in rules for r in group["rules"]}


def adapter_queries() -> dict[str, str]:
    (configmap,) = yaml_documents(ADAPTER)
    rules = yaml.safe_load(configmap["data"]["config.yaml"])["rules"]
    return {f"adapter rule {r['name']['as']}": r["seriesQuery"] for r in rules}


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """/metrics of a real server after answers of every kind: 200, 400, 404, V2, and a request
    shed for a deadline it could not meet."""
    store = tmp_path_factory.mktemp("store") / "model_store"
    shutil.copytree(STORE, store)
    settings = Settings(model_store=store, default_model="digits-mlp")
    golden = json.loads((store / "digits-mlp" / "1" / "manifest.json").read_text())["golden"]
    with serve(create_app(settings)) as base:
        assert httpx.post(f"{base}/predict", json={"inputs": golden["inputs"]}).is_success
        assert httpx.post(f"{base}/predict", json={"inputs": [[1.0]]}).status_code == 400
        assert httpx.post(f"{base}/models/nope/predict", json={"inputs": []}).status_code == 404
        v2 = {
            "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]
        }
        assert httpx.post(f"{base}/v2/models/digits-cnn/infer", json=v2).status_code == 400
        hurried = httpx.post(
            f"{base}/predict",
            json={"inputs": golden["inputs"]},
            headers={"X-Request-Timeout": "0.000000001"},  # no batch is that fast: shed
        )
        assert hurried.status_code == 503, hurried.text
        yield httpx.get(f"{base}/metrics").text


@pytest.fixture(scope="module")
def series(exposition: str) -> dict[str, set[str]]:
    """Each sample name in the exposition, with every label name it carries."""
    found: dict[str, set[str]] = defaultdict(set)
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            found[sample.name] |= set(sample.labels)
    return found


@pytest.mark.parametrize(
    "where, expr",
    sorted({**dashboard_queries(), **adapter_queries(), **alert_queries()}.items()),
    ids=str,
)
def test_every_query_reads_series_the_server_exposes(
    where: str, expr: str, series: dict[str, set[str]]
) -> None:
    query = read_promql(expr)
    assert query.metrics, f"{where}: no series in {expr}"
    for metric in query.metrics - PROMETHEUS_MADE:
        assert metric in series, f"{where}: {metric} is not in /metrics ({sorted(series)})"
        missing = query.labels[metric] - series[metric] - {"namespace", "pod"}  # added by k8s
        assert not missing, f"{where}: {metric} has no label {missing}"
    carried = set().union(*(series[m] for m in query.metrics - PROMETHEUS_MADE))
    assert query.grouping <= carried, f"{where}: grouped by {query.grouping - carried}"


def test_the_promql_reader_finds_what_it_should() -> None:
    # So that the test above fails on a renamed metric rather than reading nothing.
    query = read_promql(
        'histogram_quantile(0.99, sum by (le) (rate(foo_bucket{model=~"$model", code!="a,b"}'
        "[$__rate_interval]))) / sum(rate(bar_total[5m]))"
    )
    assert query.metrics == {"foo_bucket", "bar_total"}
    assert query.labels["foo_bucket"] == {"model", "code"} and query.grouping == {"le"}
    joined = read_promql("max by (model) (a) > 0.5 and on (model, version) max by (model) (b)")
    assert joined.metrics == {"a", "b"} and joined.grouping == {"model", "version"}


def test_the_dashboard_shows_what_operators_ask_for() -> None:
    queries = dashboard_queries()
    exprs = " ".join(queries.values())
    # Request rate by status, the three latency quantiles, batch size, queue depth, load shed
    # (by reason) or refused (413 too large, 504 timed out), and whether each model is loaded.
    assert "sum by (code) (rate(foldserve_requests_total" in exprs
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(" in exprs
    for metric in (
        "foldserve_batch_size_", "foldserve_queue_depth", "foldserve_model_loaded",
        "foldserve_input_drift_score", "foldserve_hidden_drift_score", "foldserve_stage_duration",
        "foldserve_workers_alive", "foldserve_worker_starts_total",
    ):  # fmt: skip
        assert metric in exprs
    assert "sum by (reason) (rate(foldserve_requests_shed_total" in exprs
    assert 'code=~"413|504"' in exprs
    board = json.loads(DASHBOARD.read_text())
    (source,) = yaml_documents(PROVISIONING / "datasources" / "prometheus.yaml")
    uid = source["datasources"][0]["uid"]
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
    # Requests that never reached a model carry model="": "All" must match them too.
    (variable,) = board["templating"]["list"]
    assert variable["allValue"] == ".*"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip(
            "promtool is not installed (Debian's `prometheus` package ships it; .ci/run installs "
            "it when it runs as root)"
        )
    return found


def test_promtool_accepts_the_exposition(exposition: str) -> None:
    done = subprocess.run(
        [promtool(), "check", "metrics"], input=exposition, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_accepts_composes_prometheus_config(tmp_path: Path) -> None:
    # As compose lays them out in the container: the rules file beside the config.
    shutil.copy(PROMETHEUS_CONFIG, tmp_path / "prometheus.yml")
    shutil.copy(ALERTS, tmp_path / ALERTS.name)
    done = subprocess.run(
        [promtool(), "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_wires_foldserve_prometheus_and_grafana_together() -> None:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"foldserve", "prometheus", "grafana"}
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name}: {image} is not pinned"
    # Every file compose mounts exists (paths are relative to docker/).
    mounts = {}
    for service in services.values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            assert (COMPOSE.parent / source).exists(), volume
            mounts[target] = (COMPOSE.parent / source).resolve()
    assert mounts["/var/lib/grafana/dashboards/foldserve.json"] == DASHBOARD.resolve()
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "foldserve.yaml").read_text())[
        "providers"
    ]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    # Prometheus scrapes foldserve by its compose name, on the port its image listens on.
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["foldserve:8000"]
    assert services["foldserve"]["ports"] == ["8000:8000"]
    foldserve = services["foldserve"]
    # --workers pool their metrics under /tmp: writable in memory on a read-only container.
    assert foldserve["read_only"] is True and "/tmp" in foldserve["tmpfs"]
    assert int(foldserve["environment"]["FOLDSERVE_WORKERS"]) > 1
    # docker stop waits this long before SIGKILL: at least the supervisor's bound on the drain.
    grace = re.fullmatch(r"(\d+)s", foldserve["stop_grace_period"])
    assert grace and int(grace.group(1)) >= drain_bound_s(Settings())
