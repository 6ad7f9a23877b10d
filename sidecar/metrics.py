"""Prometheus metrics (docs/design.md §7): one registry per sidecar, names are contracts.

Each sidecar owns its registry (not the process-global one) so that tests and a reloaded
mitmdump script never collide. Label values are small fixed sets; nothing per destination.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sidecar import __version__

STAGES = ("connect", "tls", "request")
# Decisions are microseconds when cached and tens of milliseconds when DNS is asked.
DECISION_BUCKETS = (
    1e-5,
    5e-5,
    1e-4,
    5e-4,
    1e-3,
    5e-3,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
)
# `*_created` series double the exposition size and no dashboard uses them.
disable_created_metrics()

DNS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# Every connection waits while the loop is stalled (a full GC of a big cache, a slow hook).
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    """All metric objects of one sidecar, created against its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.suppressed = Counter(
            "tombstone_suppressed_total",
            "Requests and connections answered locally because the destination is gone.",
            ["signal", "stage"],
            registry=r,
        )
        self.would_suppress = Counter(
            "tombstone_would_suppress_total",
            "Shadow mode (--no-enforce): would have been suppressed, was forwarded.",
            ["signal", "stage"],
            registry=r,
        )
        self.forwarded = Counter(
            "tombstone_forwarded_total",
            "Connections and requests passed on to their destination.",
            ["stage"],
            registry=r,
        )
        self.undecided = Counter(
            "tombstone_undecided_total",
            "Forwarded without a verdict because DNS could not answer (fail open).",
            ["stage"],
            registry=r,
        )
        self.dns_queries = Counter(
            "tombstone_dns_queries_total",
            "DNS queries sent by the sidecar, by record type and outcome.",
            ["rrtype", "result"],
            registry=r,
        )
        self.dns_query_seconds = Histogram(
            "tombstone_dns_query_seconds",
            "Time to answer one DNS query, including retries.",
            buckets=DNS_BUCKETS,
            registry=r,
        )
        self.decision_seconds = Histogram(
            "tombstone_decision_seconds",
            "Time to decide on one connection or request (cache hit or DNS lookup).",
            ["stage"],
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.event_loop_lag_seconds = Histogram(
            "tombstone_event_loop_lag_seconds",
            "How late the event loop woke a timer: every connection waits this long too.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "tombstone_upstream_errors_total",
            "Connections the sidecar could not open, by kind.",
            ["kind"],
            registry=r,
        )
        self.hook_errors = Counter(
            "tombstone_hook_errors_total",
            "Decision hooks that raised; what they were deciding was refused (fail closed).",
            ["hook"],
            registry=r,
        )
        self.address_refreshes = Counter(
            "tombstone_address_refreshes_total",
            "A/AAAA asked again for a live name whose addresses expired (their own TTL), by "
            "outcome: fresh, stale (DNS failed: the last addresses served, RFC 8767), failed.",
            ["outcome"],
            registry=r,
        )
        self.stale_addresses = Counter(
            "tombstone_stale_addresses_total",
            "Connections dialled to expired addresses because DNS could not answer (RFC 8767).",
            registry=r,
        )
        self.blocked_address = Counter(
            "tombstone_blocked_address_total",
            "Connections refused because every address of the target is in a blocked range.",
            registry=r,
        )
        self.tunnels_ended = Counter(
            "tombstone_tunnels_ended_total",
            "Open pass-through tunnels closed because their server was judged gone.",
            registry=r,
        )
        self.verdict_changes = Counter(
            "tombstone_verdict_changes_total",
            "Verdict transitions per destination (from 'none' for a new name).",
            ["from", "to"],
            registry=r,
        )
        self.invalid_input = Counter(
            "tombstone_invalid_input_total",
            "Malformed names from clients (CONNECT target, SNI, Host), rejected with a reason.",
            ["where"],
            registry=r,
        )
        self.store_up = Gauge(
            "tombstone_store_up",
            "1 while the verdict store (sqlite, redis) works; 0 while serving from memory only.",
            ["store"],
            registry=r,
        )
        self.store_errors = Counter(
            "tombstone_store_errors_total",
            "Verdict store operations that failed (the sidecar kept serving from memory).",
            ["store", "op"],
            registry=r,
        )
        self.store_invalid_records = Counter(
            "tombstone_store_invalid_records_total",
            "Records read from a verdict store that failed validation and were dropped "
            "(source: load = state file at start, fetch = Redis key, message = Redis "
            "pub/sub, keys = shared signing keys).",
            ["store", "source"],
            registry=r,
        )
        self.probes = Counter(
            "tombstone_probes_total",
            "HTTP probes of well-known and version endpoints (pass-through 410 learning).",
            ["result"],
            registry=r,
        )
        self.breaker_guard = Gauge(
            "tombstone_breaker_guard_tripped",
            "1 while too many destinations fail at once (our fault?): no new breakers open.",
            registry=r,
        )
        self.proxy_auth_failures = Counter(
            "tombstone_proxy_auth_failures_total",
            "Proxy requests refused with 407 (missing or wrong Proxy-Authorization).",
            registry=r,
        )
        # Admission (sidecar/admission.py): proxy connections before their first admitted request.
        self.admission_refused = Counter(
            "tombstone_admission_refused_total",
            "Proxy connections closed before admission, by reason: timeout (--head-timeout), "
            "too_large (431, --max-head-size), evicted (oldest waiting at "
            "--max-pending-clients), tls_without_connect, error (an admission hook failed).",
            ["reason"],
            registry=r,
        )
        for reason in ("timeout", "too_large", "evicted", "tls_without_connect", "error"):
            self.admission_refused.labels(reason)
        self.pending_clients = Gauge(
            "tombstone_pending_clients",
            "Proxy connections waiting for their first admitted request.",
            registry=r,
        )
        self.resurrections = Counter(
            "tombstone_resurrections_total",
            "Gone destinations lifted, by whether their signing keys changed since they were "
            "alive (true: a new identity; unknown: nothing recorded or not fetchable).",
            ["key_changed"],
            registry=r,
        )
        self.resumed_early = Counter(
            "tombstone_resumed_early_total",
            "Gone verdicts re-checked early because Synapse stopped backing off the name.",
            registry=r,
        )
        self.synapse_admin_requests = Counter(
            "tombstone_synapse_admin_requests_total",
            "Calls to Synapse's admin API (--synapse-admin-url), by operation and result.",
            ["op", "result"],
            registry=r,
        )
        # Intercept mode: the servers a send_join answer names, judged before the fan-out.
        self.prejudge_rooms = Counter(
            "tombstone_prejudge_rooms_total",
            "send_join answers read for the servers of the room (--prejudge-room), by result: "
            "read, capped (more servers than the cap; the first ones taken), unreadable.",
            ["result"],
            registry=r,
        )
        self.prejudge_names = Counter(
            "tombstone_prejudge_names_total",
            "Server names taken from send_join answers, by result: taken (valid, handed to "
            "the judge), cached (a verdict was known), judged (decided in the background), "
            "invalid (not a server name).",
            ["result"],
            registry=r,
        )
        for result in ("read", "capped", "unreadable"):
            self.prejudge_rooms.labels(result)
        for result in ("taken", "cached", "judged", "invalid"):
            self.prejudge_names.labels(result)
        self._synapse_admin_up: Gauge | None = None
        self.build_info = Gauge(
            "tombstone_build_info",
            "Build information; always 1.",
            ["version"],
            registry=r,
        )
        self.build_info.labels(__version__).set(1)
        self._verdict_counts: Callable[[], Iterable[tuple[tuple[str, str], int]]] = list
        self.registry.register(_VerdictGauge(self._current_verdict_counts))
        # Hot-path children, resolved once: a label lookup costs a lock and a dict probe.
        self.decision_by_stage = {s: self.decision_seconds.labels(s) for s in STAGES}
        self.forwarded_by_stage = {s: self.forwarded.labels(s) for s in STAGES}

    @property
    def synapse_admin_up(self) -> Gauge:
        """`tombstone_synapse_admin_up`, exported only once an admin URL is configured (a
        0 from a sidecar without one would read as an outage)."""
        if self._synapse_admin_up is None:
            self._synapse_admin_up = Gauge(
                "tombstone_synapse_admin_up",
                "1 while Synapse's admin API answers with the configured token, else 0.",
                registry=self.registry,
            )
        return self._synapse_admin_up

    def _current_verdict_counts(self) -> Iterable[tuple[tuple[str, str], int]]:
        return self._verdict_counts()

    def watch_verdicts(self, counts: Callable[[], Iterable[tuple[tuple[str, str], int]]]) -> None:
        """Export `tombstone_verdicts{state,signal}` from `counts`, computed at scrape time."""
        self._verdict_counts = counts


class _VerdictGauge(Collector):
    def __init__(self, counts: Callable[[], Iterable[tuple[tuple[str, str], int]]]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "tombstone_verdicts",
            "Cached verdicts by state and signal (alive verdicts have signal 'none').",
            labels=["state", "signal"],
        )
        for (state, signal), count in self._counts():
            family.add_metric([state, signal], count)
        yield family

    def describe(self) -> Iterable[GaugeMetricFamily]:
        yield GaugeMetricFamily("tombstone_verdicts", "", labels=["state", "signal"])
