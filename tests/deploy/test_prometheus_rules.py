"""The alert rules: valid for promtool, each alert proven by `promtool test rules` to fire on
the series that should trip it and to stay quiet otherwise, each with a runbook."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.deploy.rules import RULES_TEST, alerts, write_promtool_files
from tests.deploy.tools import DEPLOY, run, tool

# The alerts issue 7 asks for, by what they watch.
REQUIRED = {
    "TombstoneSidecarDown",
    "TombstoneSuppressionJump",
    "TombstoneDnsFailureRateHigh",
    "TombstoneBreakerGuardTripped",
    "TombstoneStoreUnavailable",
}


def test_promtool_checks_the_extracted_rules(tmp_path: Path) -> None:
    rules, _ = write_promtool_files(tmp_path)
    output = run([tool("promtool"), "check", "rules", str(rules)])
    assert f"SUCCESS: {len(alerts())} rules found" in output


def test_promtool_unit_tests_pass(tmp_path: Path) -> None:
    _, tests = write_promtool_files(tmp_path)
    output = run([tool("promtool"), "test", "rules", tests.name], cwd=tmp_path)
    assert "SUCCESS" in output


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    cases = yaml.safe_load(RULES_TEST.read_text())["tests"]
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in cases:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = set(alerts())
    assert names >= REQUIRED
    assert names - fired == set(), "alerts never shown to fire"
    assert names - quiet == set(), "alerts never shown to stay quiet"


def test_every_alert_has_a_severity_and_a_runbook_in_both_places() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for name, rule in alerts().items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        for annotation in ("summary", "description", "runbook"):
            assert rule["annotations"].get(annotation), f"{name} has no {annotation}"
        assert f"#### {name}" in readme, f"deploy/README.md has no runbook section for {name}"
