"""A real Prometheus scrapes a real sidecar with the scrape job from deploy/prometheus, loads
the alert rules, and answers every dashboard panel query and every alert expression; every
metric name those refer to is one the sidecar really exports.

There is no Grafana here (none in Debian): the dashboard is checked by evaluating each panel's
query exactly as Grafana would send it (its variables substituted), not by rendering it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.deploy.prometheus_server import PrometheusServer, local_scrape_config
from tests.deploy.promql import (
    alert_expressions,
    dashboard,
    dashboard_queries,
    exported_names,
    metric_names,
    panels,
)
from tests.deploy.rules import write_promtool_files
from tests.support.dns_server import DnsServer
from tests.support.procs import wait_until
from tests.support.sidecar_process import Sidecar

JOB = "tombstone-sidecar"
ROUNDS = (0, 1)


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    """A sidecar that has suppressed, forwarded, asked DNS and probed: most series exist."""
    with DnsServer() as dns:
        for round_ in ROUNDS:
            dns.zone.add(f"txt-gone-{round_}.test", "TXT", "v=matrix;gone")
            dns.zone.add(f"live-{round_}.test", "A", "127.0.0.2")
            dns.zone.nxdomain(f"nx-{round_}.test")
        args = ["--deny", "denied.test", "--allow-address", "127.0.0.0/8", "--probe-timeout", "1s"]
        process = Sidecar(dns.port, args, log_dir=tmp_path_factory.mktemp("sidecar")).start()
        try:
            yield process
        finally:
            process.stop()


def _traffic(sidecar: Sidecar, round_: int) -> None:
    """A denied name, and new names (so DNS is asked in every round): gone, missing, live."""
    names = ("denied.test", f"txt-gone-{round_}.test", f"nx-{round_}.test", f"live-{round_}.test")
    for target in (f"{name}:8448" for name in names):
        reply = sidecar.connect(target)
        if reply.sock is not None:
            reply.sock.close()


@pytest.fixture(scope="module")
def prometheus(
    sidecar: Sidecar, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusServer]:
    root = tmp_path_factory.mktemp("prometheus")
    rules, _ = write_promtool_files(root)
    config = local_scrape_config([f"127.0.0.1:{sidecar.ops_port}"])
    config["global"] = {"evaluation_interval": "1s"}
    config["rule_files"] = [str(rules)]
    server = PrometheusServer(root, config).start()
    try:
        _traffic(sidecar, ROUNDS[0])
        scrapes = f'count_over_time(up{{job="{JOB}"}}[1m])'
        assert wait_until(lambda: _value(server, scrapes) >= 3, timeout=30), (
            server.process.log_tail()
        )
        _traffic(sidecar, ROUNDS[1])  # again between scrapes: rates over the window are not 0
        assert wait_until(lambda: _value(server, scrapes) >= 6, timeout=30)
        yield server
    finally:
        server.stop()


def _value(server: PrometheusServer, expr: str) -> float:
    result = server.query(expr)
    return float(result[0]["value"][1]) if result else 0.0


def test_the_shipped_scrape_job_scrapes_the_sidecar(prometheus: PrometheusServer) -> None:
    (target,) = prometheus.api("targets")["activeTargets"]
    assert target["labels"]["job"] == JOB
    assert target["health"] == "up", target
    assert _value(prometheus, f'up{{job="{JOB}"}}') == 1


def test_every_dashboard_query_answers(prometheus: PrometheusServer, sidecar: Sidecar) -> None:
    """Each panel query runs without error; those whose series the sidecar has produced by
    now return data (a valid empty result is accepted only for series it never produced)."""
    produced = {name for name, _ in sidecar.metrics()}
    empty = []
    for title, expr in dashboard_queries():
        result = prometheus.query(expr)
        names = metric_names(expr)
        if not result and names <= produced:
            empty.append((title, expr))
    assert not empty, f"no data although the sidecar exports these series: {empty}"


def test_dashboard_shows_the_traffic_it_is_about(prometheus: PrometheusServer) -> None:
    by_title: dict[str, list[str]] = {}
    for title, expr in dashboard_queries():
        by_title.setdefault(title, []).append(expr)
    suppressed = prometheus.query(by_title["Suppressed vs forwarded, by signal"][0])
    assert {r["metric"]["signal"] for r in suppressed} >= {"operator", "dns_txt_gone", "nxdomain"}
    reasons = prometheus.query(by_title["Top reasons (dashboard range)"][0])
    assert {r["metric"]["signal"] for r in reasons} >= {"operator", "dns_txt_gone", "nxdomain"}
    verdicts = prometheus.query(by_title["Verdicts by state"][0])
    assert {r["metric"]["state"] for r in verdicts} >= {"gone", "alive"}
    for quantile in by_title["DNS query latency"]:
        (latency,) = prometheus.query(quantile)
        assert 0 < float(latency["value"][1]) < 5, latency  # seconds, finite
    connect = [
        r
        for q in by_title["Decision latency by stage"]
        for r in prometheus.query(q)
        if r["metric"]["stage"] == "connect"
    ]
    assert connect and all(0 < float(r["value"][1]) < 5 for r in connect), connect


def test_dashboard_variables_find_the_job_and_instance(prometheus: PrometheusServer) -> None:
    """Grafana's label_values(tombstone_build_info, job) is the label values API with match[]."""
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        definition = variable["definition"]
        label = definition.rsplit(",", 1)[1].strip(" )")
        selector = definition[len("label_values(") :].rsplit(",", 1)[0].replace("$job", JOB)
        values = prometheus.api(f"label/{label}/values", **{"match[]": selector})
        assert values, f"variable {variable['name']} would offer nothing ({definition})"


def test_every_alert_expression_evaluates(prometheus: PrometheusServer) -> None:
    for _, expr in alert_expressions():
        prometheus.query(expr)  # raises unless Prometheus answers success
    # Prometheus itself loaded and evaluated the rules: every rule healthy, none firing.
    assert wait_until(lambda: _rules_evaluated(prometheus), timeout=10), prometheus.api("rules")
    firing = prometheus.api("alerts")["alerts"]
    assert [a for a in firing if a["state"] == "firing"] == []


def _rules_evaluated(prometheus: PrometheusServer) -> bool:
    rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
    return bool(rules) and all(r["health"] == "ok" and not r.get("lastError") for r in rules)


def test_every_metric_name_in_dashboard_and_rules_is_exported(sidecar: Sidecar) -> None:
    status, body = sidecar.ops("/metrics")
    assert status == 200
    exported = set().union(*exported_names(body.decode()).values())
    referenced = {
        name: where
        for where, expr in [*dashboard_queries(), *alert_expressions()]
        for name in metric_names(expr)
    }
    unknown = {name: where for name, where in referenced.items() if name not in exported}
    assert not unknown, f"referenced but not exported by the sidecar: {unknown}"
    assert len(referenced) >= 12, sorted(referenced)


def test_dashboard_has_the_panels_the_issue_asks_for() -> None:
    titles = {p["title"] for p in panels(dashboard())}
    assert {
        "Suppressed vs forwarded, by signal",
        "Top reasons (dashboard range)",
        "Verdicts by state",
        "DNS query latency",
        "Decision latency by stage",
        "Probe results",
    } <= titles
    ids = [p["id"] for p in panels(dashboard())]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
