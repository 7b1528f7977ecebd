"""The alert rules (deploy/prometheus/foldserve-alerts.yaml): promtool accepts them and their unit
tests pass (each alert fires on the series that should raise it, after its `for`, and not on
healthy ones); the Prometheus operator's PrometheusRule holds the same groups; docs/deploy.md says
what to do about each. That every series they read exists in a real server's /metrics is
tests/deploy/test_monitoring.py's job, with the dashboard's queries."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import yaml

from tests.deploy.conftest import KUBERNETES, ROOT, yaml_documents
from tests.deploy.test_monitoring import ALERTS, promtool

ALERT_TESTS = ALERTS.with_name("foldserve-alerts.test.yaml")
PROMETHEUS_RULE = KUBERNETES / "monitoring" / "prometheusrule.yaml"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_accepts_the_rules() -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_passes_its_unit_tests_and_has_some() -> None:
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    assert tested == {rule["alert"] for rule in alerts()}
    done = subprocess.run(
        [promtool(), "test", "rules", ALERT_TESTS.name],
        cwd=ALERT_TESTS.parent,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_operators_rule_holds_the_same_groups() -> None:
    (rule,) = yaml_documents(PROMETHEUS_RULE)
    # prometheus-operator's CRD (monitoring.coreos.com/v1 PrometheusRule): spec.groups, each with
    # a name and rules; a rule has `alert` or `record`, an `expr`, and `for` as a duration.
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    kustomization = yaml.safe_load((PROMETHEUS_RULE.parent / "kustomization.yaml").read_text())
    assert PROMETHEUS_RULE.name in kustomization["resources"]


def test_each_alert_has_a_severity_a_summary_and_a_plan_in_the_docs() -> None:
    docs = DEPLOY_DOC.read_text()
    for rule in alerts():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule["alert"]
        assert f"`{rule['alert']}`" in docs, f"{rule['alert']} is not in docs/deploy.md"
