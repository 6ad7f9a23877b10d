"""The alert rules, read from their one source: deploy/prometheus/prometheusrule.yaml."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.tools import DEPLOY

PROMETHEUS_RULE = DEPLOY / "prometheus" / "prometheusrule.yaml"
RULES_TEST = DEPLOY / "prometheus" / "rules-test.yaml"
_LABEL = re.compile(r"\{\{\s*\$labels\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def groups() -> dict[str, Any]:
    """spec of the PrometheusRule: a Prometheus rule file ({"groups": [...]})."""
    spec: dict[str, Any] = yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]
    return spec


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in groups()["groups"] for r in g["rules"] if "alert" in r}


def render_annotations(rule: dict[str, Any], labels: dict[str, str]) -> dict[str, str]:
    """The annotations as Prometheus renders them for an alert with these labels.

    The rules use no template but `{{ $labels.NAME }}` (a test fails if one does), so the
    expected text of each annotation follows from the rule and the alert's labels.
    """
    rendered = {}
    for key, template in rule.get("annotations", {}).items():
        text = _LABEL.sub(lambda m: labels.get(m.group(1), ""), str(template))
        assert "{{" not in text, f"{rule['alert']}.{key}: only $labels templates are expected"
        rendered[key] = text
    return rendered


def write_promtool_files(directory: Path) -> tuple[Path, Path]:
    """rules.yaml (the extracted groups) and the unit tests with every expected alert's
    annotations filled in, side by side in `directory` for `promtool test rules`."""
    rules_path = directory / "rules.yaml"
    rules_path.write_text(yaml.safe_dump(groups(), sort_keys=False))
    tests = yaml.safe_load(RULES_TEST.read_text())
    by_name = alerts()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            rule = by_name[check["alertname"]]
            for expected in check.get("exp_alerts", []):
                if "exp_annotations" not in expected:
                    labels = {**expected.get("exp_labels", {}), "alertname": rule["alert"]}
                    expected["exp_annotations"] = render_annotations(rule, labels)
    tests_path = directory / "rules-test.yaml"
    tests_path.write_text(yaml.safe_dump(tests, sort_keys=False))
    return rules_path, tests_path
