"""The PromQL the deploy files contain, and the metric names it refers to."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from tests.deploy.rules import alerts
from tests.deploy.tools import DEPLOY

DASHBOARD = DEPLOY / "grafana" / "tombstone-sidecar.json"
_NAME = re.compile(r"\btombstone_[a-z0-9_]+\b")
# What Grafana puts in place of its variables when the dashboard is viewed; here: the
# scrape job of deploy/prometheus/scrape-config.yaml, every instance, a short window.
GRAFANA_VALUES = {
    "$__rate_interval": "1m",
    "$__range": "5m",
    "$job": "tombstone-sidecar",
    "$instance": ".*",
}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(data: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in data["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL as Grafana would send it) for every panel target."""
    return [
        (panel["title"], substitute(target["expr"]))
        for panel in panels(dashboard())
        for target in panel.get("targets", [])
    ]


def alert_expressions() -> list[tuple[str, str]]:
    return [(name, str(rule["expr"])) for name, rule in alerts().items()]


def substitute(expr: str) -> str:
    for variable, value in sorted(GRAFANA_VALUES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable the tests do not know: {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    return set(_NAME.findall(expr))


def exported_names(exposition: str) -> dict[str, set[str]]:
    """Series names a /metrics page can produce, by family, from its # TYPE lines:
    a counter X gives X_total, a histogram X gives X_bucket, X_count and X_sum."""
    names: dict[str, set[str]] = {}
    for line in exposition.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, family, kind = line.split()
        base = family.removesuffix("_total")
        if kind == "counter":
            names[family] = {base + "_total"}
        elif kind == "histogram":
            names[family] = {family + s for s in ("_bucket", "_count", "_sum")}
        else:
            names[family] = {family}
    return names
