"""Per-name accounting of what reached the dead servers, and when the sidecar judged them.

Every dead server has an address of its own (tests/scale/population.py), so each connection
attempt the SYN counter saw (kernel timestamps) belongs to one name; the fake federation
keeps every request a dead server received with its time. The sidecar logs one line per
verdict change (at `--log-level debug` also the first `alive` verdict of a name), and one
line per failed dial of a tunnel (`connect to NAME:PORT ...`); the world runs it at debug.

Issue 17's goal for the dead servers: no SYN and no request after the sidecar's first
verdict that the name is gone (`gone`: a DNS signal or a 410; `unreachable`: its breaker
opened on one of its ports). For the DNS-signal kinds that verdict comes before anything is
dialled, so the goal there is no SYN and no request at all. A breaker's trial connection
(one, `--breaker-min` after it opened: 10 min by default, longer than any run here) would
count as "after" too, though it is by design.

Synapse's own retry schedule comes from its log (INFO): every failed attempt that sets or
lengthens a destination's backoff logs one line, and every transaction it starts sending
one more. A transaction started to a name Synapse had backed off is Synapse retrying the
destination: what scenario 3 ("ten minutes later") needs to have happened for its counts to
mean anything.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tests.scale.population import DEAD_KINDS, Population

# The sidecar's log lines carry `asctime` (local time, milliseconds): an event within the
# same millisecond as the verdict line cannot be ordered against it, so it counts as before.
LOG_RESOLUTION = 0.001
_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) ([\w.]+): (.*)$")
_VERDICT = re.compile(r"^([a-z0-9.-]+?)(?::(\d+))? (gone|alive|unreachable) \((?:(\w+): )?")
_DIAL = re.compile(r"^connect to ([a-z0-9.-]+):(\d+)\b")
_PROBE = re.compile(r"^probe of ([a-z0-9.-]+): ")
_KEYS = re.compile(r"^could not record the signing keys of ([a-z0-9.-]+): ")
TIMELINE_NAMES = 2  # names of each kind whose full timeline goes into the report
# Synapse's log lines (synapse/util/retryutils.py, synapse/federation/sender/
# transaction_manager.py): a failed attempt that sets or lengthens a destination's backoff,
# `... - Connection to NAME was unsuccessful (<exception>); backoff now MS`, and each
# transaction it starts sending, `... - TX [NAME] {id} Sending transaction [id], ...`; the
# second only once the destination's retry limiter let it through.
_SYNAPSE_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - "
_BACKOFF = re.compile(
    _SYNAPSE_STAMP + r"synapse\.util\.retryutils - .*"
    r" - Connection to ([a-z0-9.-]+) was unsuccessful \(.*\); backoff now (\d+)$"
)
_TRANSACTION = re.compile(
    _SYNAPSE_STAMP + r"synapse\.federation\.sender\.transaction_manager - .*"
    r" - TX \[([a-z0-9.-]+)\] \{\d+\} Sending transaction "
)


def log_time(stamp: str) -> float:
    """Epoch seconds of a `logging` asctime (`2026-12-05 01:40:12,345`, local time)."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class Verdicts:
    """What the sidecar's log says about each name, in order."""

    # name -> [(epoch seconds, state, signal or "", port or 0)]
    changes: dict[str, list[tuple[float, str, str, int]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    # name -> [(epoch seconds, port)]: dials of Synapse's tunnels that failed
    dial_failures: dict[str, list[tuple[float, int]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    # name -> [(epoch seconds, what)]: the sidecar's own requests that failed (its probes,
    # its fetch of the name's signing keys)
    own_failures: dict[str, list[tuple[float, str]]] = field(
        default_factory=lambda: defaultdict(list)
    )

    @classmethod
    def parse(cls, log_text: str) -> Verdicts:
        found = cls()
        for line in log_text.splitlines():
            m = _LINE.match(line)
            if m is None:
                continue
            stamp, _level, logger, message = m.groups()
            if logger in ("sidecar.policy", "sidecar.breaker"):
                v = _VERDICT.match(message)
                if v is not None:
                    name, port, state, signal = v.groups()
                    entry = (log_time(stamp), state, signal or "", int(port or 0))
                    found.changes[name].append(entry)
            elif logger == "sidecar.addon":
                d = _DIAL.match(message)
                if d is not None:
                    found.dial_failures[d.group(1)].append((log_time(stamp), int(d.group(2))))
                elif (probe := _PROBE.match(message)) is not None:
                    found.own_failures[probe.group(1)].append((log_time(stamp), "probe"))
            elif logger == "sidecar.lifting" and (keys := _KEYS.match(message)) is not None:
                found.own_failures[keys.group(1)].append((log_time(stamp), "key fetch"))
        return found

    def first(self, name: str) -> tuple[float, str, str, int] | None:
        changes = self.changes.get(name)
        return changes[0] if changes else None

    def first_suppressing(self, name: str) -> tuple[float, str, str, int] | None:
        """The first `gone` or `unreachable` verdict on `name` (any port)."""
        for change in self.changes.get(name, ()):
            if change[1] in ("gone", "unreachable"):
                return change
        return None


@dataclass
class Backoffs:
    """Synapse's retry schedule per destination, from its log: when a failed attempt set
    or lengthened the destination's backoff (and to how long), and when it started sending
    each transaction."""

    # name -> [(epoch seconds, backoff in ms)], in log order
    failures: dict[str, list[tuple[float, int]]] = field(default_factory=lambda: defaultdict(list))
    transactions: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def parse(cls, log_text: str) -> Backoffs:
        found = cls()
        for line in log_text.splitlines():
            if (m := _BACKOFF.match(line)) is not None:
                stamp, name, ms = m.groups()
                found.failures[name].append((log_time(stamp), int(ms)))
            elif (t := _TRANSACTION.match(line)) is not None:
                found.transactions[t.group(2)].append(log_time(t.group(1)))
        return found

    def retries(self, name: str, since: float = 0.0) -> list[float]:
        """When Synapse started a transaction to `name` after backing it off (from `since`):
        its retry limiter let the attempt through, so a backoff had run out. Its retry
        schedule at work, not a request's own quick retries, which precede the backoff."""
        failures = self.failures.get(name)
        if not failures:
            return []
        first_backoff = failures[0][0]
        return [t for t in self.transactions.get(name, ()) if t > first_backoff and t >= since]


@dataclass
class KindCount:
    """One dead kind's totals."""

    names: int = 0
    syns: int = 0
    requests: int = 0
    names_reached: int = 0  # names with at least one SYN or request
    syns_by_port: Counter[int] = field(default_factory=Counter)
    requests_by_agent: Counter[str] = field(default_factory=Counter)
    # with a sidecar only
    judged_gone: int = 0
    never_judged_gone: int = 0
    syns_after_verdict: int = 0
    requests_after_verdict: int = 0
    # stamped after the verdict, but no byte reached the name's address after it: the
    # request was on the wire before (the fake stamps once it has read and decrypted it)
    requests_in_flight_at_verdict: int = 0
    names_reached_after_verdict: int = 0
    first_verdicts: Counter[str] = field(default_factory=Counter)  # "alive", "gone nxdomain"
    gone_signals: Counter[str] = field(default_factory=Counter)
    tunnel_dial_failures: int = 0  # dials for Synapse's tunnels the sidecar logged failing
    own_failures: Counter[str] = field(default_factory=Counter)  # the sidecar's probes, keys
    seconds_to_gone: list[float] = field(default_factory=list)  # from first contact
    # from Synapse's log: names it backed off (ever), names it sent a transaction to after
    # a backoff ran out and those transactions (within the account's window)
    synapse_backed_off: int = 0
    synapse_names_retried: int = 0
    synapse_retries: int = 0

    def summary(self, judged: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "names": self.names,
            "syns": self.syns,
            "requests": self.requests,
            "names_reached": self.names_reached,
            "syns_by_port": {str(p): n for p, n in sorted(self.syns_by_port.items())},
            "requests_by_agent": dict(sorted(self.requests_by_agent.items())),
            "synapse_backed_off": self.synapse_backed_off,
            "synapse_names_retried": self.synapse_names_retried,
            "synapse_retries": self.synapse_retries,
        }
        if judged:
            delays = sorted(self.seconds_to_gone)
            out |= {
                "judged_gone": self.judged_gone,
                "never_judged_gone": self.never_judged_gone,
                "syns_after_verdict": self.syns_after_verdict,
                "requests_after_verdict": self.requests_after_verdict,
                "requests_in_flight_at_verdict": self.requests_in_flight_at_verdict,
                "names_reached_after_verdict": self.names_reached_after_verdict,
                "first_verdicts": dict(sorted(self.first_verdicts.items())),
                "gone_signals": dict(sorted(self.gone_signals.items())),
                "tunnel_dial_failures": self.tunnel_dial_failures,
                "sidecar_own_failures": dict(sorted(self.own_failures.items())),
                "seconds_first_contact_to_gone_median": (
                    round(delays[len(delays) // 2], 3) if delays else None
                ),
                "seconds_first_contact_to_gone_max": round(delays[-1], 3) if delays else None,
            }
        return out


Attempt = tuple[float, str, int]  # (epoch seconds, destination IP, port)
GoneRequest = Sequence[Any]  # (epoch seconds, server, port, agent, path) from fakefed /gone


@dataclass
class DeadAccount:
    """Per name: each connection attempt and request, and the sidecar's verdicts."""

    population: Population
    since: float = 0.0  # count only what happened from here on (epoch seconds); 0: all
    syns: dict[str, list[tuple[float, int]]] = field(default_factory=lambda: defaultdict(list))
    requests: dict[str, list[tuple[float, str, str, str]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    verdicts: Verdicts | None = None  # None: no sidecar in this mode
    # per name, the kernel time of each data segment to its address; None: not captured
    payload: dict[str, list[float]] | None = None
    backoffs: Backoffs = field(default_factory=Backoffs)  # Synapse's, from its log

    def add_attempts(self, attempts: Iterable[Attempt]) -> None:
        by_address = self.population.by_address
        for at, ip, port in attempts:
            server = by_address.get(ip)
            if server is not None and at >= self.since:
                self.syns[server.name].append((at, port))

    def add_requests(self, requests: Iterable[GoneRequest]) -> None:
        for at, name, port, agent, path in requests:
            if name in self.population.by_name and at >= self.since:
                self.requests[name].append((at, str(port), str(agent), str(path)))

    def add_payload(self, times_by_address: dict[str, list[float]]) -> None:
        payload = self.payload if self.payload is not None else {}
        for ip, times in times_by_address.items():
            server = self.population.by_address.get(ip)
            if server is not None:
                payload.setdefault(server.name, []).extend(t for t in times if t >= self.since)
        self.payload = payload

    def _late_requests(self, name: str, at: float) -> tuple[int, int]:
        """(requests after `at`, requests stamped after it whose bytes were all on the wire
        before it). With the wire captured, a late stamp counts only if payload reached the
        name's address after `at` (finding 9 in docs/scale.md)."""
        stamped = sum(1 for r in self.requests.get(name, []) if r[0] > at)
        wire = None if self.payload is None else self.payload.get(name)
        # No capture, or one that missed this name's requests entirely: trust the stamps.
        if not wire or any(t > at for t in wire):
            return stamped, 0
        return 0, stamped

    def by_kind(self) -> dict[str, KindCount]:
        kinds = {kind: KindCount() for kind in DEAD_KINDS}
        verdicts = self.verdicts
        for server in self.population.dead:
            count = kinds[server.kind]
            count.names += 1
            syns = self.syns.get(server.name, [])
            requests = self.requests.get(server.name, [])
            count.syns += len(syns)
            count.requests += len(requests)
            count.names_reached += bool(syns or requests)
            count.syns_by_port.update(port for _, port in syns)
            count.requests_by_agent.update(agent for _, _, agent, _ in requests)
            retries = self.backoffs.retries(server.name, self.since)
            count.synapse_backed_off += bool(self.backoffs.failures.get(server.name))
            count.synapse_names_retried += bool(retries)
            count.synapse_retries += len(retries)
            if verdicts is None:
                continue
            first = verdicts.first(server.name)
            count.first_verdicts[_label(first) if first else "none"] += 1
            count.tunnel_dial_failures += len(verdicts.dial_failures.get(server.name, []))
            count.own_failures.update(w for _, w in verdicts.own_failures.get(server.name, []))
            gone = verdicts.first_suppressing(server.name)
            if gone is None:
                count.never_judged_gone += 1
                continue
            count.judged_gone += 1
            count.gone_signals[_label(gone)] += 1
            at = gone[0] + LOG_RESOLUTION
            late_syns = sum(1 for t, _ in syns if t > at)
            late_requests, in_flight = self._late_requests(server.name, at)
            count.syns_after_verdict += late_syns
            count.requests_after_verdict += late_requests
            count.requests_in_flight_at_verdict += in_flight
            count.names_reached_after_verdict += bool(late_syns or late_requests)
            contact = [t for t, _ in syns] + [r[0] for r in requests]
            if contact:
                count.seconds_to_gone.append(max(0.0, gone[0] - min(contact)))
        return kinds

    def summary(self) -> dict[str, Any]:
        judged = self.verdicts is not None
        kinds = self.by_kind()
        out: dict[str, Any] = {k: c.summary(judged) for k, c in kinds.items()}
        total = {
            "syns": sum(c.syns for c in kinds.values()),
            "requests": sum(c.requests for c in kinds.values()),
            "synapse_names_retried": sum(c.synapse_names_retried for c in kinds.values()),
            "synapse_retries": sum(c.synapse_retries for c in kinds.values()),
        }
        if judged:
            total |= {
                "syns_after_verdict": sum(c.syns_after_verdict for c in kinds.values()),
                "requests_after_verdict": sum(c.requests_after_verdict for c in kinds.values()),
                "never_judged_gone": sum(c.never_judged_gone for c in kinds.values()),
            }
        out["total"] = total
        return out

    def late_names(self) -> list[str]:
        """The names something reached after the sidecar's first gone verdict on them."""
        if self.verdicts is None:
            return []
        late = []
        for server in self.population.dead:
            gone = self.verdicts.first_suppressing(server.name)
            if gone is None:
                continue
            at = gone[0] + LOG_RESOLUTION
            late_syns = any(t > at for t, _ in self.syns.get(server.name, []))
            if late_syns or self._late_requests(server.name, at)[0]:
                late.append(server.name)
        return late

    def timelines(
        self, names_per_kind: int = TIMELINE_NAMES, names: Sequence[str] | None = None
    ) -> dict[str, list[str]]:
        """A few names of each reached kind (or `names`), every event in order (seconds from
        the name's first event): what made each attempt and when the verdicts came."""
        if names is None:
            chosen: list[str] = []
            for kind in DEAD_KINDS:
                reached = [
                    s.name
                    for s in self.population.of_kind(kind)
                    if self.syns.get(s.name) or self.requests.get(s.name)
                ]
                chosen += reached[:names_per_kind]
            names = chosen
        out: dict[str, list[str]] = {}
        for name in names:
            events: list[tuple[float, str]] = []
            events += [(t, f"SYN :{port}") for t, port in self.syns.get(name, [])]
            events += [
                (t, f"request :{port} {agent} {path}")
                for t, port, agent, path in self.requests.get(name, [])
            ]
            events += [
                (t, f"Synapse backs off {ms} ms") for t, ms in self.backoffs.failures.get(name, [])
            ]
            if self.verdicts is not None:
                events += [
                    (t, f"verdict {_label((t, s, g, p))}" + (f" :{p}" if p else ""))
                    for t, s, g, p in self.verdicts.changes.get(name, [])
                ]
                events += [
                    (t, f"tunnel dial failed :{port}")
                    for t, port in self.verdicts.dial_failures.get(name, [])
                ]
                events += [
                    (t, f"sidecar's {what} failed")
                    for t, what in self.verdicts.own_failures.get(name, [])
                ]
            events.sort()
            if not events:
                continue
            start = events[0][0]
            out[name] = [f"{t - start:8.3f} {what}" for t, what in events]
        return out


def _label(change: tuple[float, str, str, int]) -> str:
    _, state, signal, _ = change
    return f"{state} {signal}" if signal and state != "unreachable" else state
