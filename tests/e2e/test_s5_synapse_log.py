"""Scenario 5: what a suppressed request costs in Synapse's log, and a quieter refusal.

Synapse 1.163 raises `ProxyConnectError` for any non-200 answer to its CONNECT, inside
Twisted's `dataReceived`; Twisted logs that as `CRITICAL - Unhandled Error` with a
traceback. So answering a refused CONNECT with a 502 writes one CRITICAL traceback (about
20 lines) to Synapse's log per refusal, although Synapse handles the failure correctly.
Closing the connection without an answer gives Synapse the same failure, so the sidecar
does that by default (`--refusal close`); `--refusal status` keeps the 502.

The comparison runs a fresh Synapse behind each refusal method, does the same actions
(profile twice, join by alias, invite, join by room ID via the dead server, a message in
a room shared with a server of each tombstone kind) and compares client answers, the
`destinations` backoff and the log. Methods:

    sidecar          the real `tombstone-sidecar run` as shipped (--refusal close)
    sidecar-status   the same with --refusal status (502 + JSON + Connection: close)
    200-close        a raw proxy: 200 Connection established, then FIN before TLS
    reset            a raw proxy: RST without answering

Measured: every method gives the same client answers and the same backoff; only the 502
writes CRITICAL tracebacks. A closing sidecar also closes Synapse's `CONNECT :0` (its
request for an SRV target "."), which mitmproxy would otherwise answer 400 itself
(sidecar/empty_connect.py), so Synapse's log stays free of them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.e2e.actions import (
    Outcome,
    create_room,
    delta,
    invite,
    join,
    profile,
    send_text,
    suppressed,
)
from tests.e2e.refusal_proxy import RefusalProxy
from tests.e2e.world import (
    FEDERATION,
    LIVE_IP,
    MEMBER_TOMBSTONES,
    TOMBSTONES,
    World,
)
from tests.support.procs import wait_until
from tests.support.synapse_server import Synapse, count_critical

_ports = itertools.count(8010)
TARGET = TOMBSTONES[0]  # txt-gone.test: a TXT tombstone on the 410 remote
MIN_RETRY_MS = 600_000
METHODS = ("sidecar", "sidecar-status", "200-close", "reset")


def test_refused_connects_leave_synapse_log_quiet(
    world: World, client: httpx.Client, record: Callable[[str, str], None]
) -> None:
    """The main world (the sidecar as shipped): count Synapse's log lines per suppression."""
    assert world.synapse is not None and world.sidecar is not None
    profile(client, TARGET.user)  # afterwards the failed well-known fetch is cached
    time.sleep(0.3)
    mark = world.synapse.log_mark()
    before = suppressed(world.sidecar)
    for _ in range(5):
        assert profile(client, TARGET.user).status == 502
    time.sleep(0.3)
    refused = delta(suppressed(world.sidecar), before).get(TARGET.signal, 0)
    counts = count_critical(world.synapse.log_since(mark))
    record("s5 sidecar (close)", f"{refused:.0f} suppressed CONNECTs -> Synapse log {counts}")
    assert refused == 5
    assert counts["critical"] == counts["traceback"] == 0


@dataclass
class ExperimentProxy:
    url: str
    stop: Callable[[], object]
    refused: Callable[[], int]


def _raw_proxy(method: str) -> ExperimentProxy:
    gone = {t.name for t in (*TOMBSTONES, *MEMBER_TOMBSTONES)}
    gone |= {f"old.{n.removesuffix('.test')}.invalid" for n in gone}
    live = ("live.test", "srv.test", "wk.test", "fed.srv.test", "fed.wk.test")
    proxy = RefusalProxy(method, gone, dict.fromkeys(live, LIVE_IP)).start()
    return ExperimentProxy(proxy.url, proxy.stop, lambda: sum(proxy.refused.values()))


@pytest.fixture
def experiment(world: World) -> Iterator[Callable[[str], tuple[Synapse, ExperimentProxy]]]:
    """A refusal method's proxy and a fresh Synapse behind it; both stopped afterwards."""
    stops: list[Callable[[], object]] = []

    def start(method: str) -> tuple[Synapse, ExperimentProxy]:
        assert world.sidecar is not None
        if method == "sidecar":
            sidecar = world.sidecar
            proxy = ExperimentProxy(
                sidecar.proxy_url, lambda: None, lambda: int(sum(suppressed(sidecar).values()))
            )
        elif method == "sidecar-status":
            answering = world.start_sidecar(["--refusal", "status"])
            proxy = ExperimentProxy(
                answering.proxy_url,
                answering.stop,
                lambda: int(sum(suppressed(answering).values())),
            )
        else:
            proxy = _raw_proxy(method)
        stops.append(proxy.stop)
        port = next(_ports)
        synapse = world.start_synapse(
            f"synapse-{method}", f"hs-{port}.test", port, proxy.url, federation=FEDERATION
        )
        stops.append(synapse.stop)
        return synapse, proxy

    yield start
    for stop in reversed(stops):
        stop()


@pytest.mark.parametrize("method", METHODS)
def test_refusal_methods_compared(
    method: str,
    world: World,
    experiment: Callable[[str], tuple[Synapse, ExperimentProxy]],
    record: Callable[[str, str], None],
) -> None:
    dead_before = world.dead_connections()
    synapse, proxy = experiment(method)
    account = synapse.register("alice")
    mark = synapse.log_mark()
    refused_before = proxy.refused()
    with synapse.client(account, timeout=30) as c:
        room = create_room(c)
        outcomes: list[Outcome] = [
            profile(c, TARGET.user),
            profile(c, TARGET.user),
            join(c, TARGET.alias),
            invite(c, room, TARGET.user),
            join(c, TARGET.room_id, via=TARGET.name),
        ]
        row = synapse.wait_for_destination(TARGET.name, timeout=5)
        joined = join(c, world.live.add_shared_room(f"shared-{method}"))
        assert joined.status == 200, joined
        sent = send_text(c, joined.body["room_id"], "anyone still there?")
        assert sent.status == 200, sent
        member_rows = {t.name: synapse.wait_for_destination(t.name, 15) for t in MEMBER_TOMBSTONES}
    assert wait_until(lambda: proxy.refused() > refused_before, timeout=5)
    time.sleep(0.5)
    counts = count_critical(synapse.log_since(mark))
    refused = proxy.refused() - refused_before

    for outcome in outcomes:
        record(f"s5 {method}", str(outcome))
    backoffs = {n: r and r["retry_interval"] for n, r in member_rows.items()}
    record(f"s5 {method}", f"join by room id -> backoff {row and row['retry_interval']} ms")
    record(f"s5 {method}", f"/send to dead room members -> backoff {backoffs}")
    record(f"s5 {method}", f"{refused} refused CONNECTs -> Synapse log {counts}")

    assert [o.status for o in outcomes] == [502] * len(outcomes), outcomes
    assert all(o.seconds < 1.0 for o in outcomes if o.action != "invite"), outcomes
    assert row is not None and row["retry_interval"] == MIN_RETRY_MS, row
    assert set(backoffs.values()) == {MIN_RETRY_MS}, backoffs
    assert world.new_dead_connections(dead_before) == {}
    if method == "sidecar-status":
        # one per suppressed CONNECT, plus one per `CONNECT :0` mitmproxy rejects (400)
        assert counts["critical"] == counts["traceback"] >= refused > 0
    else:  # the shipped sidecar closes, `CONNECT :0` (SRV ".") included: no traceback
        assert counts["critical"] == counts["traceback"] == 0
