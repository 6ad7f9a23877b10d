"""Every dashboard panel query parses as PromQL by promtool's own parser (each one written as
a recording rule), with Grafana's variables substituted as Grafana would; the live
evaluation against a real Prometheus is in test_live_prometheus.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.deploy.promql import dashboard_queries
from tests.deploy.tools import run, tool


def _write_rules(path: Path, exprs: list[str]) -> Path:
    rules = [{"record": f"tombstone_dashboard:panel_{i}", "expr": e} for i, e in enumerate(exprs)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return path


def test_promtool_parses_every_panel_query(tmp_path: Path) -> None:
    exprs = [expr for _, expr in dashboard_queries()]
    assert len(exprs) >= 15, exprs
    rules = _write_rules(tmp_path / "dashboard.rules.yaml", exprs)
    output = run([tool("promtool"), "check", "rules", str(rules)])
    assert f"SUCCESS: {len(exprs)} rules found" in output


def test_promtool_rejects_a_broken_panel_query(tmp_path: Path) -> None:
    """A control: a query Grafana would show as an error fails here too."""
    (_, expr), *_ = dashboard_queries()
    rules = _write_rules(tmp_path / "broken.rules.yaml", [expr + ")"])
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0 and "parse error" in result.stdout + result.stderr
