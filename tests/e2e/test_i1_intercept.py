"""Intercept mode against a real Synapse (issue 4's test-world scenarios), and pass-through
probing.

Each scenario runs a fresh Synapse behind its own sidecar (tests.e2e.intercept):

    intercepting   --mode intercept --upstream-ca <world CA> --no-probe; Synapse trusts a
                   bundle of the sidecar's own CA (made in its state dir) + the world's CA
    lifting        the same with --min-gone-ttl 1s --gone-ttl 2s --min-ttl 1s
    probing        pass-through with --probe --upstream-ca <world CA>

The switchable remote (127.0.3.1:443/8448) serves flip.test, gone410.test, back.test and
probe.test and answers 410 to everything for the names in its `gone` set.

What Synapse 1.163 shows the client: a failed federation profile query is always 502
"Failed to fetch profile" (our 410 text never reaches it); an invite to a gone server gets
the sidecar's 410 with the server and the signal named, at once (i2): in intercept mode the
CONNECT to a gone server is accepted and each request inside is answered by its class.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.e2e.actions import (
    Outcome,
    create_room,
    delta,
    invite,
    join,
    join_via,
    profile,
    suppressed,
)
from tests.e2e.actions import verdict as verdict_of
from tests.e2e.intercept import Behind, FlipRemote, start_behind
from tests.e2e.world import TOMBSTONES, World
from tests.support.procs import wait_until
from tests.support.synapse_server import count_critical

TXT_GONE = TOMBSTONES[0]  # txt-gone.test: TXT "v=matrix;gone", A -> the 410 remote
FLIP, GONE410, BACK, PROBE = "flip.test", "gone410.test", "back.test", "probe.test"
CLIENT_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def flip(world: World) -> Iterator[FlipRemote]:
    remote = FlipRemote(world, [FLIP, GONE410, BACK, PROBE]).start()
    remote.gone.add(GONE410)
    yield remote
    remote.stop()


@pytest.fixture(scope="module")
def world_ca(world: World) -> str:
    return str(world.ca.ca_pem_path)


@pytest.fixture(scope="module")
def icept(world: World, flip: FlipRemote, world_ca: str) -> Behind:
    return start_behind(
        world, "synapse-intercept", ["--mode", "intercept", "--upstream-ca", world_ca]
    )


@pytest.fixture(scope="module")
def icept_client(icept: Behind) -> Iterator[httpx.Client]:
    with icept.synapse.client(icept.account, timeout=CLIENT_TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def learned_410(icept: Behind, icept_client: httpx.Client, flip: FlipRemote) -> Outcome:
    """gone410.test judged gone by the intercepting sidecar from a real 410 response."""
    first = profile(icept_client, f"@carol:{GONE410}")
    assert wait_until(
        lambda: verdict_of(icept.sidecar, GONE410).get("signal") == "http_410", timeout=5
    ), verdict_of(icept.sidecar, GONE410)
    return first


def _ask_until(
    ask: Callable[[], Outcome], done: Callable[[Outcome], bool], timeout: float = 10.0
) -> list[Outcome]:
    """Ask every 0.2 s until `done(last answer)`; every answer (fails after `timeout`)."""
    outcomes: list[Outcome] = []

    def step() -> bool:
        outcomes.append(ask())
        return done(outcomes[-1])

    assert wait_until(step, timeout=timeout, interval=0.2), outcomes
    return outcomes


def _record_all(record: Callable[[str, str], None], topic: str, outcomes: list[Outcome]) -> None:
    for outcome in outcomes:
        record(topic, f"{outcome} {outcome.body.get('error', '')!r}")


# -- 1. join via [dead, live] -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("dead", "live"),
    [(TXT_GONE.name, "live.test"), (GONE410, "srv.test")],
    ids=["dns_txt_gone", "http_410"],
)
def test_i1_join_via_dead_then_live_succeeds_through_the_live_one(
    dead: str,
    live: str,
    world: World,
    icept: Behind,
    icept_client: httpx.Client,
    learned_410: Outcome,
    record: Callable[[str, str], None],
) -> None:
    # A fresh room: joining a shared #lobby would put this Synapse into the main world's rooms.
    room = world.live.add_room(live, f"i1-{dead.split('.', maxsplit=1)[0]}")
    dead_before = world.dead_connections()
    before = suppressed(icept.sidecar)
    outcome = join_via(icept_client, room, [dead, live])
    counted = delta(suppressed(icept.sidecar), before)
    _record_all(record, f"i1 join via [{dead}, {live}]", [outcome])
    record(f"i1 join via [{dead}, {live}]", f"suppressed {counted}")
    assert outcome.status == 200 and outcome.body.get("room_id") == room, outcome
    assert outcome.seconds < 5, outcome
    assert counted, "the dead server was not tried first (nothing suppressed)"
    assert world.new_dead_connections(dead_before) == {}


# -- 2. invite a user on a tombstoned server --------------------------------------------------


@pytest.mark.parametrize(
    ("server", "signal"),
    [
        pytest.param(
            TXT_GONE.name,
            "dns_txt_gone",
            id="dns_txt_gone",
        ),
        pytest.param(
            GONE410,
            "http_410",
            id="http_410",
        ),
    ],
)
def test_i2_invite_to_a_tombstoned_server_names_server_and_signal(
    server: str,
    signal: str,
    world: World,
    icept: Behind,
    icept_client: httpx.Client,
    learned_410: Outcome,
    record: Callable[[str, str], None],
) -> None:
    dead_before = world.dead_connections()
    room = create_room(icept_client)
    outcome = invite(icept_client, room, f"@carol:{server}")
    _record_all(record, f"i2 invite @carol:{server}", [outcome])
    error = str(outcome.body.get("error", ""))
    assert world.new_dead_connections(dead_before) == {}
    assert 400 <= outcome.status < 500, outcome
    assert f"{server} is decommissioned ({signal}:" in error, outcome.body
    assert outcome.seconds < 2, outcome


# -- 3. a pooled tunnel to a server that turns 410 ---------------------------------------------


def test_i3_server_turning_410_is_cut_off_at_the_next_request(
    icept: Behind,
    icept_client: httpx.Client,
    flip: FlipRemote,
    record: Callable[[str, str], None],
) -> None:
    user = f"@carol:{FLIP}"
    warm = [profile(icept_client, user) for _ in range(3)]
    assert [o.status for o in warm] == [200, 200, 200], warm
    connects = icept.sidecar.metric("tombstone_forwarded_total", stage="connect")

    before = suppressed(icept.sidecar)
    flip.gone.add(FLIP)
    turned = time.monotonic()
    first = profile(icept_client, user)
    later = [profile(icept_client, user) for _ in range(5)]
    seen = flip.requests_for(FLIP, since=turned)
    new_connects = icept.sidecar.metric("tombstone_forwarded_total", stage="connect") - connects
    answered_here = delta(suppressed(icept.sidecar), before).get("http_410", 0)

    _record_all(record, "i3 turns 410", [*warm[-1:], first, *later])
    record(
        "i3 turns 410",
        f"remote saw after turning: {[(s.line, s.status) for s in seen]}; new CONNECTs "
        f"forwarded: {new_connects:.0f}; answered by the sidecar in the tunnel: "
        f"{answered_here:.0f}",
    )
    assert [s.status for s in seen] == [410], seen  # its first 410, then nothing
    assert new_connects == 0  # all in the tunnel Synapse had pooled before the switch
    assert answered_here == len(later), answered_here
    # Synapse turns any failed federation profile query into 502 "Failed to fetch profile"
    # (synapse/handlers/profile.py), whoever answered 410: the text cannot reach the client.
    for outcome in (first, *later):
        assert outcome.status == 502, outcome
    assert all(o.seconds < 1 for o in later), later
    assert verdict_of(icept.sidecar, FLIP).get("signal") == "http_410"


# -- 4. a server that comes back is lifted after its TTL ----------------------------------------


def test_i4_server_that_comes_back_is_lifted_after_its_ttl(
    world: World, flip: FlipRemote, world_ca: str, record: Callable[[str, str], None]
) -> None:
    lifting = start_behind(
        world,
        "synapse-lifting",
        [
            "--mode",
            "intercept",
            "--upstream-ca",
            world_ca,
            "--min-gone-ttl",
            "1s",
            "--gone-ttl",
            "2s",
            "--min-ttl",
            "1s",
        ],
    )
    sidecar, user = lifting.sidecar, f"@carol:{BACK}"
    world.zone.add(BACK, "TXT", "v=matrix;gone", ttl=1)
    flip.gone.add(BACK)
    with lifting.synapse.client(lifting.account, timeout=CLIENT_TIMEOUT) as c:
        tombstoned = profile(c, user)
        assert verdict_of(sidecar, BACK).get("signal") == "dns_txt_gone"
        assert flip.requests_for(BACK) == []

        # DNS tombstone removed, the server still answers 410: learned from its answer.
        world.zone.remove(BACK, "TXT")
        outcomes = _ask_until(
            lambda: profile(c, user),
            lambda _: verdict_of(sidecar, BACK).get("signal") == "http_410",
        )
        gone_seen = len(flip.requests_for(BACK))

        # The server is back: suppressed until the 410 verdict's TTL (2 s), then lifted.
        flip.gone.discard(BACK)
        back_at = time.monotonic()
        before = suppressed(sidecar)
        while_gone = profile(c, user)
        answered_here = delta(suppressed(sidecar), before)
        flowing = _ask_until(lambda: profile(c, user), lambda last: last.status == 200)
        lifted_in = time.monotonic() - back_at
        final = profile(c, user)

    _record_all(record, "i4 comes back", [tombstoned, *outcomes[-2:], while_gone, flowing[-1]])
    record(
        "i4 comes back",
        f"requests reaching it while 410: {gone_seen}; lifted "
        f"{lifted_in:.1f} s after it came back (--gone-ttl 2s); "
        f"{len(flowing)} profile calls until 200",
    )
    assert tombstoned.status == 502, tombstoned
    assert gone_seen >= 1
    # Synapse answers any failed profile query 502 "Failed to fetch profile" (see i3).
    assert while_gone.status == 502 and answered_here == {"http_410": 1}, answered_here
    assert len(flip.requests_for(BACK)) > gone_seen  # the lifted name is reached again
    assert final.status == 200 and final.body == {"displayname": f"Carol of {BACK}"}, final
    assert lifted_in < 6, lifted_in
    assert verdict_of(sidecar, BACK).get("state") == "alive"


# -- 6. pass-through probing --------------------------------------------------------------------

# The race this scenario lives with: pass-through cannot stop a request inside a tunnel it
# let through before the verdict. The probe starts at the first CONNECT and is done in
# ~7 ms, about when Synapse's own well-known GET arrives through that tunnel (measured
# 2-6 ms after the verdict was logged). Every later CONNECT is refused.


def test_i6_passthrough_probe_judges_410_server_gone_after_first_connect(
    world: World, flip: FlipRemote, world_ca: str, record: Callable[[str, str], None]
) -> None:
    flip.gone.add(PROBE)
    probing = start_behind(world, "synapse-probing", ["--probe", "--upstream-ca", world_ca])
    sidecar, user = probing.sidecar, f"@carol:{PROBE}"
    with probing.synapse.client(probing.account, timeout=CLIENT_TIMEOUT) as c:
        first = profile(c, user)
        assert wait_until(
            lambda: verdict_of(sidecar, PROBE).get("signal") == "http_410",
            timeout=10,
            interval=0.02,
        ), verdict_of(sidecar, PROBE)
        connects = sidecar.metric("tombstone_forwarded_total", stage="connect")
        asked_later = time.monotonic()
        later = [profile(c, user) for _ in range(3)]
    seen = flip.requests_for(PROBE)
    probes = [s for s in seen if s.from_probe]
    synapse_reqs = [s for s in seen if not s.from_probe]
    done = _logged_at(sidecar.log(), f"{PROBE} gone (http_410")  # the probe's verdict, wall clock
    after = [s for s in synapse_reqs if s.wall > done]
    tunnels = {s.connection for s in synapse_reqs}

    _record_all(record, "i6 probe", [first, *later])
    timeline = [(s.line, s.connection, round((s.wall - done) * 1000, 1)) for s in synapse_reqs]
    record(
        "i6 probe",
        f"probe requests {[s.line for s in probes]}; Synapse's requests that "
        f"reached it (line, (port, connection), ms after the verdict): {timeline}; "
        f"CONNECTs forwarded {connects:.0f}",
    )
    assert probes, seen
    # A CONNECT after the verdict is refused, so the forwarded ones all came before it (the
    # first, as measured). Synapse's requests reached the server only through those
    # tunnels: maybe just after the verdict (the race above: `after`), never later.
    assert sidecar.metric("tombstone_forwarded_total", stage="connect") == connects
    assert len(tunnels) <= connects, (tunnels, connects)
    assert len(after) <= len(tunnels), after
    assert [s for s in synapse_reqs if s.at >= asked_later] == []
    for outcome in later:
        assert outcome.status == 502 and outcome.seconds < 1, outcome


def _logged_at(log: str, text: str) -> float:
    """Wall-clock time of the first sidecar log line containing `text`."""
    line = next(line for line in log.splitlines() if text in line)
    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


# -- 7. SRV target "." (CONNECT :0) ------------------------------------------------------------


def test_i7_srv_dot_is_answered_inside_connect_empty_host_with_the_reason(
    world: World, icept: Behind, icept_client: httpx.Client, record: Callable[[str, str], None]
) -> None:
    """srv-dot.test's `_matrix-fed._tcp` SRV is ".": Synapse's own SRV lookup gives no host
    and it sends `CONNECT :0`. Intercept mode accepts it, reads the server from the SNI and
    the X-Matrix destination, and answers each request by its class: the invite comes back
    as 410 naming the server and dns_srv_dot in milliseconds (it took ~3.3 s of Synapse
    retries ending in "Can't connect" when the tunnel was closed), with no CRITICAL line."""
    server = TOMBSTONES[1].name
    assert TOMBSTONES[1].signal == "dns_srv_dot"
    dead_before = world.dead_connections()
    mark = icept.synapse.log_mark()
    before = suppressed(icept.sidecar)
    room = create_room(icept_client)
    outcomes = [
        invite(icept_client, room, f"@carol:{server}"),
        profile(icept_client, f"@carol:{server}"),
        join(icept_client, f"#lobby:{server}"),
    ]
    counted = delta(suppressed(icept.sidecar), before)
    counts = count_critical(icept.synapse.log_since(mark))
    _record_all(record, f"i7 SRV '.' {server}", outcomes)
    record(f"i7 SRV '.' {server}", f"suppressed {counted}; Synapse log {counts}")
    invited = outcomes[0]
    assert invited.status == 410, invited
    assert f"{server} is decommissioned (dns_srv_dot:" in str(invited.body.get("error")), invited
    assert all(o.seconds < 1 for o in outcomes), outcomes
    assert all(o.status >= 400 for o in outcomes), outcomes
    assert counted.get("dns_srv_dot", 0) >= len(outcomes), counted
    assert counts["critical"] == counts["traceback"] == 0, counts
    assert world.new_dead_connections(dead_before) == {}


# -- 5. Synapse's log ---------------------------------------------------------------------------


def test_i5_no_critical_lines_in_synapse_log_from_intercept_suppression(
    world: World, icept: Behind, record: Callable[[str, str], None]
) -> None:
    """Runs last: everything the intercepting Synapses logged during the scenarios above."""
    intercepting = {icept.synapse.server_name, *_lifting_names(world)}
    logs = {s.server_name: s.log_text() for s in world.synapses if s.server_name in intercepting}
    assert icept.synapse.server_name in logs, sorted(logs)  # and the lifting one, after i4
    for name, text in logs.items():
        record("i5 Synapse log", f"{name}: {count_critical(text)}")
    for name, text in logs.items():
        counts = count_critical(text)
        assert counts["critical"] == counts["traceback"] == 0, (name, counts)


def _lifting_names(world: World) -> set[str]:
    return {s.server_name for s in world.synapses if s.directory.name == "synapse-lifting"}
