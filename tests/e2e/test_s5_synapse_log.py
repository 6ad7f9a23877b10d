"""Scenario 5: what a suppressed request costs in Synapse's log, and a quieter refusal.

Synapse 1.163 raises `ProxyConnectError` for any non-200 answer to its CONNECT, inside
Twisted's `dataReceived`; Twisted logs that as `CRITICAL - Unhandled Error` with a
traceback. So with the sidecar's 502 every refused CONNECT writes one CRITICAL traceback
(about 20 lines) to Synapse's log, although Synapse handles the failure correctly.

The comparison runs a fresh Synapse behind each refusal method, does the same actions
(profile twice, join by alias, invite, join by room ID via the dead server, a message in
a room shared with a server of each tombstone kind) and compares client answers, the
`destinations` backoff and the log. Methods:

    sidecar          the real `tombstone-sidecar run` (502 + JSON + Connection: close)
    sidecar-close    the same addon, closing the CONNECT unanswered (close_refusal_addon.py)
    200-close        a raw proxy: 200 Connection established, then FIN before TLS
    reset            a raw proxy: RST without answering

Measured: every method gives the same client answers and the same backoff; only the 502
writes CRITICAL tracebacks. What remains with a closing sidecar is `CONNECT :0` (SRV
target "."), which mitmproxy itself answers 400 before any addon runs.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

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
from tests.e2e.synapse import Synapse, count_critical
from tests.e2e.world import (
    FEDERATION,
    LIVE_IP,
    MEMBER_TOMBSTONES,
    ROOT,
    SIDECAR_DNS_PORT,
    TOMBSTONES,
    World,
)
from tests.support.procs import ManagedProcess, free_port, wait_until

_ports = itertools.count(8010)
TARGET = TOMBSTONES[0]  # txt-gone.test: a TXT tombstone on the 410 remote
MIN_RETRY_MS = 600_000
METHODS = ("sidecar", "sidecar-close", "200-close", "reset")


def test_one_critical_traceback_per_refused_connect(
    world: World, client: httpx.Client, record: Callable[[str, str], None]
) -> None:
    """The main world (the sidecar as it is): count Synapse's log lines per suppression."""
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
    record("s5 sidecar (502)", f"{refused:.0f} suppressed CONNECTs -> Synapse log {counts}")
    assert refused == 5
    assert counts["critical"] == counts["traceback"] == refused


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


def _closing_sidecar(directory: Path) -> ExperimentProxy:
    """mitmdump with close_refusal_addon.py: the sidecar's decisions, closing unanswered."""
    port, ops = free_port(), free_port()
    mitmdump = Path(sys.executable).parent / "mitmdump"
    argv = [str(mitmdump)] if mitmdump.exists() else [sys.executable, "-m", "mitmproxy.tools.dump"]
    argv += [
        "-q",
        "--listen-host",
        "127.0.0.1",
        "-p",
        str(port),
        "--set",
        f"confdir={directory}",
        "--set",
        "connection_strategy=lazy",
        "-s",
        str(ROOT / "tests" / "e2e" / "close_refusal_addon.py"),
        "--set",
        f"tombstone_nameserver=127.0.0.1:{SIDECAR_DNS_PORT}",
        "--set",
        "tombstone_allow_address=127.0.0.0/8",
        "--set",
        f"tombstone_ops_listen=127.0.0.1:{ops}",
    ]
    process = ManagedProcess(
        argv, cwd=ROOT, env={"PYTHONPATH": str(ROOT)}, log_path=directory / "mitmdump.log"
    ).start()
    process.wait_for_port(port, timeout=20)
    process.wait_for_port(ops, timeout=20)

    def refused() -> int:
        try:
            text = httpx.get(f"http://127.0.0.1:{ops}/metrics", timeout=5).text
        except httpx.HTTPError:
            return -1
        return int(
            sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("tombstone_suppressed_total{")
            )
        )

    return ExperimentProxy(f"http://127.0.0.1:{port}", process.stop, refused)


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
        elif method == "sidecar-close":
            proxy = _closing_sidecar(Path(tempfile.mkdtemp(dir=world.directory)))
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
    if method == "sidecar":
        # one per suppressed CONNECT, plus one per `CONNECT :0` mitmproxy rejects (400)
        assert counts["critical"] == counts["traceback"] >= refused > 0
    elif method == "sidecar-close":
        # only the `CONNECT :0`s (member-dot.test's SRV "."), answered 400 by mitmproxy
        assert counts["critical"] == counts["traceback"] < refused
    else:
        assert counts["critical"] == counts["traceback"] == 0
