"""Verdicts that last and are shared: restarts, broken state files, Redis, ops API, lists.

Everything runs for real: the sidecar processes, their SQLite files, a redis-server that
the tests kill and restart, and the ops API and CLI over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import tracemalloc
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from sidecar.judge.verdicts import Verdict, decode_record
from sidecar.metrics import Metrics
from sidecar.store.bounded_resp import BoundedRESP2Parser, OversizedReply, bounded_parser
from sidecar.store.redis import CHANNEL, FORGOTTEN_PREFIX, KEY_PREFIX, RedisStore
from sidecar.store.sqlite import SCHEMA
from tests.integration.conftest import BASE_ARGS, DEAD_IP, LIVE_IP
from tests.support.dns_server import DnsServer, Zone
from tests.support.procs import wait_until
from tests.support.redis_server import RedisServer
from tests.support.sidecar_process import Sidecar, sidecar_command
from tests.support.tls_upstream import TestCA, Upstream

TOKEN = "0123456789abcdef0123456789abcdef"


async def _eventually(condition: Callable[[], object]) -> None:
    """Wait (without blocking the loop) until `condition()` holds, 10 s at most; the
    caller asserts what must hold."""
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.05)


async def _arrives(redis: RedisServer, name: str, received: list[Verdict]) -> None:
    """Another sidecar's verdict for `name`, published now, is the one the store hands on."""
    await asyncio.to_thread(publish, redis, message(record(name)))
    await _eventually(lambda: received)
    assert [v.destination for v in received] == [name]


def gone_name(zone: Zone, unique: Callable[[str], str], prefix: str) -> str:
    name = unique(prefix)
    zone.add(name, "TXT", "v=matrix;gone")
    zone.add(name, "A", DEAD_IP)
    return name


# -- persistence ---------------------------------------------------------------------------


def test_restart_keeps_verdicts_without_asking_dns_again(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    dns_server: DnsServer,
    dead_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    sidecar = sidecar_factory()
    name = gone_name(zone, unique, "persist")
    assert sidecar.connect(f"{name}:{dead_upstream.port}").status == 502
    assert wait_until(lambda: (sidecar.state_dir / "verdicts.sqlite3").stat().st_size > 0)
    queries = dns_server.query_count(name)

    sidecar.restart()
    reply = sidecar.connect(f"{name}:{dead_upstream.port}")
    assert reply.status == 502 and reply.headers["x-tombstone-signal"] == "dns_txt_gone"
    assert dns_server.query_count(name) == queries  # judged from the state file, not DNS
    assert dead_upstream.connections == 0
    assert "loaded 1 verdict(s)" in sidecar.log() or "verdict(s) from" in sidecar.log()


def test_corrupt_state_file_is_moved_aside_and_the_sidecar_serves(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    tmp_path: Path,
    live_upstream: Upstream,
    ca: TestCA,
    unique: Callable[[str], str],
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "verdicts.sqlite3").write_bytes(b"this is not a database\x00" * 100)
    sidecar = sidecar_factory("--state-dir", str(state))
    assert "is unreadable" in sidecar.log() and "moved it to" in sidecar.log()
    assert [p.name for p in state.iterdir() if ".corrupt-" in p.name]
    assert sidecar.metric("tombstone_store_errors_total", store="sqlite", op="corrupt") == 1
    assert sidecar.metric("tombstone_store_up", store="sqlite") == 1
    name = unique("after-corrupt")
    zone.add(name, "A", LIVE_IP)
    status, _, _ = sidecar.https_get(f"{name}:{live_upstream.port}", name, ca.client_context())
    assert status == 200


def test_unusable_state_dir_serves_from_memory_and_says_so(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    dead_upstream: Upstream,
    tmp_path: Path,
    unique: Callable[[str], str],
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    sidecar = sidecar_factory("--state-dir", str(blocker / "state"))
    assert sidecar.metric("tombstone_store_up", store="sqlite") == 0
    ready = json.loads(sidecar.ops("/readyz")[1])
    assert ready["status"] == "ready"
    assert ready["store"]["up"] is False and "serving from memory" in ready["store"]["detail"]
    name = gone_name(zone, unique, "memonly")
    assert sidecar.connect(f"{name}:{dead_upstream.port}").status == 502


# -- ops API and CLI -----------------------------------------------------------------------


def request(
    sidecar: Sidecar,
    method: str,
    path: str,
    token: str | None = None,
    body: dict[str, object] | None = None,
) -> tuple[int, dict[str, object]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"http://127.0.0.1:{sidecar.ops_port}{path}", data=data, method=method
    )
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "ops-token"
    path.write_text(TOKEN + "\n")
    return path


def test_ops_api_changes_need_the_token(
    sidecar_factory: Callable[..., Sidecar],
    token_file: Path,
    zone: Zone,
    dead_upstream: Upstream,
    live_upstream: Upstream,
    ca: TestCA,
    unique: Callable[[str], str],
) -> None:
    read_only = sidecar_factory()
    status, body = request(read_only, "PUT", "/v1/verdicts/x.hs.test", TOKEN)
    assert status == 403 and "--ops-token-file" in str(body["error"])

    sidecar = sidecar_factory("--ops-token-file", str(token_file), "--deny", "static.hs.test")
    name = unique("api")
    zone.add(name, "A", DEAD_IP)
    assert request(sidecar, "PUT", f"/v1/verdicts/{name}")[0] == 401
    assert request(sidecar, "PUT", f"/v1/verdicts/{name}", "wrong-token-wrong-token")[0] == 401
    status, verdict = request(
        sidecar,
        "PUT",
        f"/v1/verdicts/{name}",
        TOKEN,
        {"ttl": "7d", "comment": "shut down by its admins"},
    )
    assert status == 200
    assert (verdict["state"], verdict["signal"], verdict["evidence"]) == (
        "gone",
        "operator",
        "shut down by its admins",
    )
    assert float(verdict["expires_at"]) - float(verdict["observed_at"]) == 7 * 86400  # type: ignore[arg-type]
    reply = sidecar.connect(f"{name}:{dead_upstream.port}")
    assert reply.status == 502 and "shut down by its admins" in str(reply.json()["error"])

    zone.remove(name, "A")
    zone.add(name, "A", LIVE_IP)
    status, verdict = request(sidecar, "DELETE", f"/v1/verdicts/{name}", TOKEN)
    assert status == 200 and verdict["state"] == "alive"
    code, _, _ = sidecar.https_get(f"{name}:{live_upstream.port}", name, ca.client_context())
    assert code == 200
    status, body = request(sidecar, "DELETE", "/v1/verdicts/static.hs.test", TOKEN)
    assert status == 409 and "--deny" in str(body["error"])
    status, body = request(sidecar, "PUT", f"/v1/verdicts/{name}", TOKEN, {"ttl": "soon"})
    assert status == 400 and "not a duration" in str(body["error"])
    assert dead_upstream.connections == 0


def test_verdicts_cli_end_to_end_and_operator_verdicts_survive_restart(
    sidecar_factory: Callable[..., Sidecar],
    token_file: Path,
    zone: Zone,
    unique: Callable[[str], str],
) -> None:
    sidecar = sidecar_factory("--ops-token-file", str(token_file))
    base = ["--ops-listen", f"127.0.0.1:{sidecar.ops_port}", "--ops-token-file", str(token_file)]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*sidecar_command(), "verdicts", *args, *base],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    name = unique("cli")
    zone.add(name, "A", DEAD_IP)
    denied = cli("deny", name, "--ttl", "30d", "--comment", "retired in 2026")
    assert denied.returncode == 0, denied.stderr
    assert "state:        gone" in denied.stdout and "retired in 2026" in denied.stdout
    listing = cli("list", "--state", "gone")
    assert listing.returncode == 0
    assert listing.stdout.splitlines()[0].split() == [
        "DESTINATION",
        "STATE",
        "SIGNAL",
        "EXPIRES",
        "SUPPRESSED",
        "EVIDENCE",
    ]
    row = next(line for line in listing.stdout.splitlines() if line.startswith(name))
    assert row.split()[1:4] == ["gone", "operator", "30d"]
    shown = json.loads(cli("show", name, "--json").stdout)
    assert shown["signal"] == "operator"
    assert cli("show", unique("nothing")).returncode == 1

    sidecar.restart()
    assert json.loads(cli("show", name, "--json").stdout)["evidence"] == "retired in 2026"
    forgotten = cli("forget", name, "--json")
    assert forgotten.returncode == 0 and json.loads(forgotten.stdout)["state"] == "alive"
    unreachable = subprocess.run(
        [*sidecar_command(), "verdicts", "list", "--ops-listen", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert unreachable.returncode == 3 and "cannot reach the sidecar" in unreachable.stderr


def test_verdicts_list_sorted_by_suppressed_puts_the_most_refused_server_first(
    sidecar_factory: Callable[..., Sidecar], zone: Zone, unique: Callable[[str], str]
) -> None:
    sidecar = sidecar_factory()
    names = [unique("hammered"), unique("sometimes"), unique("once")]
    for name, tries in zip(names, (5, 3, 1), strict=True):
        zone.nxdomain(name)
        for _ in range(tries):
            assert sidecar.connect(f"{name}:8448").status == 502

    listing = subprocess.run(
        [
            *sidecar_command(),
            "verdicts",
            "list",
            "--sort",
            "suppressed",
            "--state",
            "gone",
            "--json",
            "--ops-listen",
            f"127.0.0.1:{sidecar.ops_port}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert listing.returncode == 0, listing.stderr
    rows = [
        (v["destination"], v["suppressed_count"]) for v in json.loads(listing.stdout)["verdicts"]
    ]
    assert rows[:3] == list(zip(names, (5, 3, 1), strict=True))
    status, body = sidecar.ops("/v1/verdicts?sort=loudest")
    assert status == 400 and b"sort must be one of name, suppressed" in body


# -- operator lists ------------------------------------------------------------------------


def test_deny_file_is_reloaded_on_change_and_sighup_and_a_broken_file_changes_nothing(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    tmp_path: Path,
    dead_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    first, second = unique("listed"), unique("added")
    for name in (first, second):
        zone.add(name, "A", DEAD_IP)
    deny = tmp_path / "deny.txt"
    deny.write_text(f"{first}\n")
    sidecar = sidecar_factory("--deny-file", str(deny))
    assert sidecar.connect(f"{first}:443").headers.get("x-tombstone-signal") == "operator"

    deny.write_text(f"{first}\n{second}\n")
    assert wait_until(lambda: "deny list: +1 -0, 2 total" in sidecar.log(), timeout=10)
    reply = sidecar.connect(f"{second}:{dead_upstream.port}")
    assert reply.headers.get("x-tombstone-signal") == "operator"

    deny.write_text(f"{first}\nnot a name!\n")
    assert wait_until(lambda: "keeping the previous lists" in sidecar.log(), timeout=10)
    assert "line 2" in sidecar.log()
    assert sidecar.connect(f"{second}:443").headers.get("x-tombstone-signal") == "operator"

    deny.write_text(f"{second}\n")
    stamp = os.stat(deny).st_mtime
    os.utime(deny, (stamp, stamp))
    assert sidecar.process.proc is not None
    os.kill(sidecar.process.proc.pid, signal.SIGHUP)
    assert wait_until(lambda: "deny list: +0 -1, 1 total" in sidecar.log(), timeout=10)
    # judged again at once, with no request for it (Synapse may be backing it off): a lift
    assert wait_until(lambda: sidecar.ops(f"/v1/verdicts/{first}")[0] == 200, timeout=10)
    assert json.loads(sidecar.ops(f"/v1/verdicts/{first}")[1])["state"] == "alive"
    assert sidecar.metric("tombstone_verdict_changes_total", **{"from": "gone", "to": "alive"}) == 1
    assert dead_upstream.connections == 0


# -- Redis ---------------------------------------------------------------------------------


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


def test_forget_through_the_ops_api_judges_afresh_not_from_the_stores_copy(
    sidecar_factory: Callable[..., Sidecar],
    redis: RedisServer,
    zone: Zone,
    token_file: Path,
    dead_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    """With a shared store a DELETE lifts a name DNS now calls alive: the re-check asks DNS,
    not the store, whose forget is written behind and may still hold the old verdict."""
    sidecar = sidecar_factory("--store", redis.url, "--ops-token-file", str(token_file))
    name = gone_name(zone, unique, "afresh")
    assert sidecar.connect(f"{name}:{dead_upstream.port}").status == 502
    key = f"tombstone:v1:verdict:{name}"
    assert wait_until(lambda: b"dns_txt_gone" in redis.command("GET", key), timeout=10)
    zone.remove(name, "TXT")  # the tombstone is gone: DNS now says alive

    status, body = request(sidecar, "DELETE", f"/v1/verdicts/{name}", TOKEN)

    assert status == 200 and body["state"] == "alive", body
    assert sidecar.tunnel_opens(f"{name}:{dead_upstream.port}")


def test_two_sidecars_share_a_verdict_through_redis(
    sidecar_factory: Callable[..., Sidecar],
    redis: RedisServer,
    zone: Zone,
    dns_server: DnsServer,
    dead_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    one = sidecar_factory("--store", redis.url)
    two = sidecar_factory("--store", redis.url)
    assert one.metric("tombstone_store_up", store="redis") == 1
    name = gone_name(zone, unique, "shared")
    assert one.connect(f"{name}:{dead_upstream.port}").status == 502
    # pushed to the other sidecar by pub/sub: it knows without asking DNS or being asked
    assert wait_until(lambda: two.ops(f"/v1/verdicts/{name}")[0] == 200, timeout=1.0)
    reply = two.connect(f"{name}:{dead_upstream.port}")
    assert reply.headers["x-tombstone-signal"] == "dns_txt_gone"
    assert dns_server.query_count(name, "TXT") == 1
    stored = json.loads(redis.command("GET", f"tombstone:v1:verdict:{name}").split(b"\r\n")[1])
    assert stored["signal"] == "dns_txt_gone"

    late = sidecar_factory("--store", redis.url)  # a new replica fetches instead of asking DNS
    assert late.connect(f"{name}:{dead_upstream.port}").status == 502
    assert dns_server.query_count(name, "TXT") == 1
    assert dead_upstream.connections == 0


def test_redis_outage_degrades_to_the_local_cache_and_recovers(
    sidecar_factory: Callable[..., Sidecar],
    redis: RedisServer,
    zone: Zone,
    dead_upstream: Upstream,
    live_upstream: Upstream,
    ca: TestCA,
    unique: Callable[[str], str],
) -> None:
    sidecar = sidecar_factory("--store", redis.url)
    known = gone_name(zone, unique, "before-outage")
    assert sidecar.connect(f"{known}:443").status == 502

    redis.stop()
    assert wait_until(lambda: sidecar.metric("tombstone_store_up", store="redis") == 0, timeout=15)
    ready = json.loads(sidecar.ops("/readyz")[1])
    assert ready["status"] == "ready" and ready["store"]["up"] is False
    assert sidecar.connect(f"{known}:{dead_upstream.port}").status == 502  # local cache
    during = gone_name(zone, unique, "during-outage")
    assert sidecar.connect(f"{during}:{dead_upstream.port}").status == 502  # DNS still works
    live = unique("live-outage")
    zone.add(live, "A", LIVE_IP)
    code, _, _ = sidecar.https_get(f"{live}:{live_upstream.port}", live, ca.client_context())
    assert code == 200

    redis.start()
    assert wait_until(lambda: sidecar.metric("tombstone_store_up", store="redis") == 1, timeout=30)
    assert wait_until(lambda: during.encode() in redis.command("KEYS", "tombstone:*"), timeout=5)
    assert "redis store DOWN" in sidecar.log() and "redis store up" in sidecar.log()
    assert dead_upstream.connections == 0


def test_disk_full_keeps_serving_from_memory_and_recovers(
    dns_server: DnsServer,
    zone: Zone,
    tmp_path: Path,
    dead_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    """The state directory is a tiny tmpfs in the sidecar's own mount namespace: it fills up,
    the sidecar says so and keeps serving; grown again, the pending writes land."""
    state = tmp_path / "state"
    state.mkdir()
    sidecar = Sidecar(
        dns_server.port,
        ["--allow-address", "127.0.0.0/8", "--refusal", "status", "--state-dir", str(state)],
        log_dir=tmp_path,
    )
    mount = 'mount -t tmpfs -o size=64k tmpfs "$0" && exec "$@"'
    sidecar.argv[:0] = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        mount,
        str(state),
    ]
    sidecar.process.argv = sidecar.argv
    sidecar.start()
    try:
        names = [unique("full") for _ in range(400)]
        for name in names:
            zone.add(name, "TXT", "v=matrix;gone; " + "padding=" + "x" * 200)
        for name in names:
            assert sidecar.connect(f"{name}:{dead_upstream.port}").status == 502
            if sidecar.metric("tombstone_store_up", store="sqlite") == 0:
                break
        assert wait_until(
            lambda: sidecar.metric("tombstone_store_up", store="sqlite") == 0, timeout=10
        )
        ready = json.loads(sidecar.ops("/readyz")[1])
        assert ready["status"] == "ready" and "full" in ready["store"]["detail"]
        assert sidecar.metric("tombstone_store_errors_total", store="sqlite", op="write") >= 1
        assert sidecar.connect(f"{names[0]}:{dead_upstream.port}").status == 502  # from memory

        assert sidecar.process.proc is not None
        grow = [
            "nsenter",
            "--target",
            str(sidecar.process.proc.pid),
            "--mount",
            "mount",
            "-o",
            "remount,size=16m",
            str(state),
        ]
        subprocess.run(grow, check=True, timeout=10)
        assert wait_until(
            lambda: sidecar.metric("tombstone_store_up", store="sqlite") == 1, timeout=20
        )
        assert "sqlite store up" in sidecar.log()
    finally:
        sidecar.stop()
    assert dead_upstream.connections == 0


# -- hostile records: every store validates what it reads (issue 14, defect 2) -----------


def record(
    name: str, state: object = "gone", signal: str | None = "dns_txt_gone", **fields: object
) -> dict[str, object]:
    now = time.time()
    base: dict[str, object] = {
        "destination": name,
        "state": state,
        "signal": signal,
        "evidence": "planted by the test",
        "observed_at": now,
        "expires_at": now + 3600,
        "addresses": [],
    }
    return {**base, **fields}


def alive(name: str, *addresses: str) -> dict[str, object]:
    return record(name, "alive", None, addresses=list(addresses))


def write_state_file(state: Path, rows: list[tuple[str, str | bytes]]) -> Path:
    """A state file as the sidecar writes it (WAL, its schema), holding `rows` verbatim."""
    state.mkdir(exist_ok=True)
    path = state / "verdicts.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    db.executemany(
        "INSERT INTO verdicts VALUES (?, ?, ?)",
        [(name, raw, time.time() + 3600) for name, raw in rows],
    )
    db.close()
    return path


DEEP = "[" * 100_000 + "]" * 100_000  # json.loads: RecursionError; 200 kB
DEEP_SMALL = '{"destination": ' + "[" * 5000 + "]" * 5000 + "}"  # under the size bound


def hostile_rows(unique: Callable[[str], str]) -> list[tuple[str, str | bytes]]:
    """One row per way a record can be wrong; each one names its own destination."""
    rows: list[tuple[str, str | bytes]] = []

    def add(prefix: str, make: Callable[[str], object]) -> None:
        name = unique(prefix)
        made = make(name)
        rows.append((name, made if isinstance(made, str | bytes) else json.dumps(made)))

    add("non-ip", lambda n: alive(n, "localhost"))
    add("deep", lambda n: DEEP)
    add("deep-small", lambda n: DEEP_SMALL)
    add("huge-evidence", lambda n: record(n, evidence="x" * 5000))
    add("giant", lambda n: record(n, evidence="x" * 1_000_000))
    add("wrong-types", lambda n: record(n, observed_at="yesterday"))
    add("state-type", lambda n: record(n, state=7))
    add("unknown-signal", lambda n: record(n, signal="rumour"))
    add("not-json", lambda n: "not json at all")
    add("blob", lambda n: b"\xff\xfe binary")
    add(
        "nan", lambda n: json.dumps(record(n)).replace('"expires_at": ', '"expires_at": NaN, "x": ')
    )
    rows.append(("Bad Name!", json.dumps(record("Bad Name!"))))
    upper = unique("upper").upper()
    rows.append((upper, json.dumps(record(upper))))  # not the normalized form
    other = unique("mismatch")
    rows.append((other, json.dumps(record(unique("someone-else")))))
    rows.append((None, json.dumps(record(unique("null-destination")))))  # type: ignore[arg-type]
    return rows


def test_hostile_state_file_rows_are_dropped_and_counted_and_good_rows_still_serve(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    dns_server: DnsServer,
    dead_upstream: Upstream,
    tmp_path: Path,
    unique: Callable[[str], str],
) -> None:
    good = gone_name(zone, unique, "good-row")
    bad = hostile_rows(unique)
    write_state_file(tmp_path / "state", [*bad, (good, json.dumps(record(good)))])

    sidecar = sidecar_factory("--state-dir", str(tmp_path / "state"))

    assert sidecar.metric(
        "tombstone_store_invalid_records_total", store="sqlite", source="load"
    ) == len(bad)
    assert sidecar.metric("tombstone_store_up", store="sqlite") == 1
    log = sidecar.log()
    assert log.count("invalid stored verdict(s)") == 1, log  # one line for all of them
    assert f"dropped {len(bad)} invalid stored verdict(s)" in log
    assert "loaded 1 verdict(s)" in log and "Traceback" not in log
    reply = sidecar.connect(f"{good}:{dead_upstream.port}")
    assert reply.status == 502 and reply.headers["x-tombstone-signal"] == "dns_txt_gone"
    assert dns_server.query_count(good) == 0  # served from the good row, not from DNS
    listed = json.loads(sidecar.ops("/v1/verdicts")[1])
    assert [v["destination"] for v in listed["verdicts"]] == [good]
    assert dead_upstream.connections == 0


class Canary:
    """A TCP listener on loopback that counts every connection it is offered."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def test_stored_junk_addresses_never_make_the_sidecar_dial_loopback(
    dns_server: DnsServer, zone: Zone, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    """Issue 14: an alive verdict whose address is not an IP made the hooks raise, and
    mitmproxy then dialled the name itself: loopback reached without --allow-address."""
    canary = Canary()
    junk = ["localhost", "127.1", "0x7f.0.0.1", "2130706433", " 127.0.0.1", "127.0.0.1:80"]
    names = [unique("canary") for _ in junk]
    rows: list[tuple[str, str | bytes]] = [
        (n, json.dumps(alive(n, a))) for n, a in zip(names, junk, strict=True)
    ]
    mapped = unique("mapped")  # a valid IP literal: loaded, and the guard refuses it
    rows += [
        ("localhost", json.dumps(alive("localhost", "localhost"))),
        (mapped, json.dumps(alive(mapped, "::ffff:127.0.0.1"))),
    ]
    for name in [*names, mapped]:
        zone.add(name, "A", "127.0.0.1")  # DNS leads to loopback too: the guard must hold
    write_state_file(tmp_path / "state", rows)
    sidecar = Sidecar(
        dns_server.port,
        ["--refusal", "status", "--no-probe", "--state-dir", str(tmp_path / "state")],
        log_dir=tmp_path,
    )
    try:
        sidecar.start()
        assert (
            sidecar.metric("tombstone_store_invalid_records_total", store="sqlite", source="load")
            == len(junk) + 1
        )
        for name in [*names, "localhost", mapped]:
            for target in (f"{name}:{canary.port}", f"{name}:443"):
                assert not sidecar.tunnel_opens(target), target
        assert "Traceback" not in sidecar.log() and "Addon error" not in sidecar.log()
    finally:
        sidecar.stop()
        canary.close()
    assert canary.connections == 0


def test_read_only_state_file_still_loads_its_verdicts_and_says_it_is_not_persisting(
    dns_server: DnsServer,
    zone: Zone,
    tmp_path: Path,
    dead_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    """Decided for issue 14: a read-only state directory (a read-only volume) serves the
    verdicts it holds, runs without persistence and reports the store down, in one line."""
    stored = gone_name(zone, unique, "read-only")
    state = tmp_path / "state"
    write_state_file(state, [(stored, json.dumps(record(stored)))])
    sidecar = Sidecar(dns_server.port, [*BASE_ARGS, "--state-dir", str(state)], log_dir=tmp_path)
    read_only = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    sidecar.argv[:0] = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        read_only,
        str(state),
    ]
    sidecar.process.argv = sidecar.argv
    try:
        sidecar.start()
        reply = sidecar.connect(f"{stored}:{dead_upstream.port}")
        assert reply.status == 502 and reply.headers["x-tombstone-signal"] == "dns_txt_gone"
        assert dns_server.query_count(stored) == 0
        assert sidecar.metric("tombstone_store_up", store="sqlite") == 0
        ready = json.loads(sidecar.ops("/readyz")[1])
        assert ready["status"] == "ready" and ready["store"]["up"] is False
        assert "read-only" in ready["store"]["detail"] and "loaded 1" in ready["store"]["detail"]
        learned = gone_name(zone, unique, "in-memory")
        assert sidecar.connect(f"{learned}:{dead_upstream.port}").status == 502
        warnings = [line for line in sidecar.log().splitlines() if "read-only" in line]
        assert len(warnings) == 1, warnings
    finally:
        sidecar.stop()
    assert dead_upstream.connections == 0


def publish(redis: RedisServer, payload: str) -> None:
    assert redis.command("PUBLISH", CHANNEL, payload).startswith(b":")


def message(verdict: dict[str, object], origin: str = "another-replica") -> str:
    return json.dumps({"origin": origin, "destination": verdict["destination"], "verdict": verdict})


def test_hostile_redis_keys_and_messages_are_dropped_and_the_subscriber_keeps_listening(
    sidecar_factory: Callable[..., Sidecar],
    redis: RedisServer,
    zone: Zone,
    dead_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    sidecar = sidecar_factory("--store", redis.url)
    keyed = [unique("key") for _ in range(5)]
    for name in keyed:
        zone.add(name, "A", DEAD_IP)  # what DNS says once the key is refused
    values = [
        json.dumps(alive(keyed[0], "localhost")),
        DEEP,
        json.dumps(record(unique("elsewhere"))),
        "x" * 1_000_000,
    ]
    for name, value in zip(keyed, values, strict=False):
        redis.command("SET", KEY_PREFIX + name, value)
    redis.command("RPUSH", KEY_PREFIX + keyed[4], "not a string")
    for name in keyed:  # judged by DNS (alive): the sidecar fetched, refused, and moved on
        assert sidecar.tunnel_opens(f"{name}:{dead_upstream.port}")
    # Each name's key was fetched once and refused (a fetch over its 5 ms budget on a busy
    # machine is skipped instead, and counted as such).
    refused = sidecar.metric("tombstone_store_invalid_records_total", store="redis", source="fetch")
    skipped = sidecar.metric("tombstone_store_errors_total", store="redis", op="fetch_timeout")
    assert refused >= 1 and refused + skipped == len(keyed), (refused, skipped)

    target = unique("target")
    bad_messages = [
        "[" * 10_000,  # under the size bound: json.loads raises RecursionError
        DEEP_SMALL,  # DEEP (200 kB) is over it: refused unread, see test_a_huge_message_...
        "not json",
        "[]",
        message(alive(target, "localhost")),
        message(record(target, signal="rumour")),
        json.dumps({"origin": "x", "destination": target, "verdict": record(unique("other"))}),
        json.dumps({"origin": "x", "destination": "Bad Name!"}),
    ]  # an oversized message costs the connection: see test_a_huge_message_is_refused_...
    for payload in bad_messages:
        publish(redis, payload)
    publish(redis, message(record(target)))  # a good one after all of them
    assert wait_until(lambda: sidecar.ops(f"/v1/verdicts/{target}")[0] == 200, timeout=10)
    reply = sidecar.connect(f"{target}:{dead_upstream.port}")
    assert reply.status == 502 and reply.headers["x-tombstone-signal"] == "dns_txt_gone"
    assert sidecar.metric(
        "tombstone_store_invalid_records_total", store="redis", source="message"
    ) == len(bad_messages)
    assert sidecar.metric("tombstone_store_up", store="redis") == 1  # bad records: no outage
    log = sidecar.log()
    assert log.count("invalid record(s) from") == 1, log  # rate-limited: once a minute
    assert "Traceback" not in log
    assert dead_upstream.connections == 0


def test_a_lost_subscription_shows_the_store_down_until_it_is_resubscribed(
    sidecar_factory: Callable[..., Sidecar],
    redis: RedisServer,
    unique: Callable[[str], str],
) -> None:
    sidecar = sidecar_factory("--store", redis.url)
    assert b"tombstone:v1:verdicts" in redis.command("PUBSUB", "CHANNELS")
    # No resubscribing for now: the window in which the store is down stays open.
    assert redis.command("ACL", "SETUSER", "default", "-subscribe") == b"+OK\r\n"
    assert redis.command("CLIENT", "KILL", "TYPE", "pubsub").startswith(b":1")

    assert wait_until(lambda: sidecar.metric("tombstone_store_up", store="redis") == 0, timeout=10)
    ready = json.loads(sidecar.ops("/readyz")[1])
    assert ready["store"]["up"] is False and "subscribe" in ready["store"]["detail"], ready
    # Refused resubscriptions (NOPERM) keep it down: no flapping up and down between them.
    assert wait_until(
        lambda: sidecar.metric("tombstone_store_errors_total", store="redis", op="subscribe") >= 3,
        timeout=10,
    )
    assert sidecar.metric("tombstone_store_up", store="redis") == 0
    assert sidecar.log().count("redis store DOWN") == 1

    redis.command("ACL", "SETUSER", "default", "+subscribe")
    assert wait_until(lambda: sidecar.metric("tombstone_store_up", store="redis") == 1, timeout=30)
    assert json.loads(sidecar.ops("/readyz")[1])["store"]["up"] is True
    name = unique("after-resubscribe")
    publish(redis, message(record(name)))
    assert wait_until(lambda: sidecar.ops(f"/v1/verdicts/{name}")[0] == 200, timeout=10)
    assert "redis store DOWN" in sidecar.log() and "redis store up" in sidecar.log()


def test_a_subscriber_task_that_ends_is_reported_and_started_again(redis: RedisServer) -> None:
    """Not a message and not a lost connection: the subscriber task itself ended (here,
    cancelled from outside). Health says so at once, and a new subscriber takes over."""

    async def scenario() -> None:
        store = RedisStore(redis.url, Metrics())
        received: list[Verdict] = []
        await store.start(received.append, lambda name: None)
        try:
            assert store.health().up
            first = store._listener
            assert first is not None
            first.cancel()
            await asyncio.wait([first])
            await asyncio.sleep(0)  # its done callback runs
            health = store.health()
            assert not health.up and "stopped" in health.detail, health
            assert store.metrics.store_up.labels("redis")._value.get() == 0

            await _eventually(lambda: store.health().up)
            assert store.health().up and store._listener is not first
            await _arrives(redis, "restarted.hs.test", received)
        finally:
            await store.close()

    asyncio.run(scenario())


def resp(*args: bytes | str) -> bytes:
    """One command in RESP, as any Redis client sends it."""
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    return f"*{len(parts)}\r\n".encode() + b"".join(
        b"$%d\r\n%s\r\n" % (len(part), part) for part in parts
    )


def pipelined(redis: RedisServer, *commands: tuple[bytes | str, ...]) -> list[bytes]:
    """Send `commands` in one write on one connection, so Redis runs them back to back,
    and return each one-line reply (PUBLISH, SET)."""
    with socket.create_connection(("127.0.0.1", redis.port), timeout=30) as sock:
        sock.sendall(b"".join(resp(*command) for command in commands))
        replies = sock.makefile("rb")
        return [replies.readline() for _ in commands]


def pubsub_clients(redis: RedisServer) -> list[str]:
    """The ids of the clients subscribed to something (the sidecar's subscriber)."""
    listing = redis.command("CLIENT", "LIST", "TYPE", "pubsub").decode()
    return [word[3:] for word in listing.split() if word.startswith("id=")]


def memory_kib(pid: int, field: str) -> int:
    """VmRSS or VmHWM (the peak) of a process, from the kernel."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


HUGE_MESSAGE_BYTES = 64 * 1024 * 1024  # what a buggy or hostile publisher may send
MEMORY_GROWTH_BOUND_KIB = 16 * 1024  # far below the message: it was never buffered


def test_a_huge_message_is_refused_from_its_length_and_nothing_published_meanwhile_is_lost(
    sidecar_factory: Callable[..., Sidecar],
    redis: RedisServer,
    zone: Zone,
    dead_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    """A 64 MiB PUBLISH on the channel by some other Redis client: the sidecar reads its
    length, not its body (its peak memory does not grow by anything like it), drops the
    connection with one warning, resubscribes, and reads the verdict keys again, so a
    verdict whose message sat behind the huge one arrives anyway; it keeps serving."""
    # Redis's own guard would cut a subscriber off at 32 MiB of pending output: off, so
    # that the sidecar's bound is what is tested (an operator may well have raised it).
    reply = redis.command("CONFIG", "SET", "client-output-buffer-limit", "pubsub 0 0 0")
    assert reply == b"+OK\r\n"
    sidecar = sidecar_factory("--store", redis.url)
    assert sidecar.process.proc is not None
    pid = sidecar.process.proc.pid
    denied = gone_name(zone, unique, "denied")
    assert sidecar.connect(f"{denied}:{dead_upstream.port}").status == 502
    subscriber = pubsub_clients(redis)
    assert len(subscriber) == 1, subscriber
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM starts again from VmRSS
    before = memory_kib(pid, "VmRSS")

    # Another sidecar's verdict, written (key, then message) right behind the huge message:
    # its message is in the stream the sidecar drops unread.
    missed = unique("behind-the-huge-one")
    replies = pipelined(
        redis,
        ("PUBLISH", CHANNEL, b"x" * HUGE_MESSAGE_BYTES),
        ("SET", KEY_PREFIX + missed, json.dumps(record(missed)), "PX", "3600000"),
        ("PUBLISH", CHANNEL, message(record(missed))),
    )
    assert replies == [b":1\r\n", b"+OK\r\n", b":1\r\n"]  # both went to the sidecar

    def refused() -> float:
        return sidecar.metric(
            "tombstone_store_invalid_records_total", store="redis", source="message"
        )

    assert wait_until(lambda: refused() == 1, timeout=10), sidecar.log()
    assert wait_until(lambda: pubsub_clients(redis) not in ([], subscriber), timeout=10)
    assert len(pubsub_clients(redis)) == 1  # the old connection is gone, a new one listens
    # read again from its key after resubscribing (the cache only: GET never fetches)
    assert wait_until(lambda: sidecar.ops(f"/v1/verdicts/{missed}")[0] == 200, timeout=10)
    after = unique("after-the-huge-one")  # published by another sidecar once resubscribed
    publish(redis, message(record(after)))
    assert wait_until(lambda: sidecar.ops(f"/v1/verdicts/{after}")[0] == 200, timeout=10)
    grown = memory_kib(pid, "VmHWM") - before
    assert grown < MEMORY_GROWTH_BOUND_KIB, f"peak memory grew by {grown} KiB"

    # A second one (just over the bound): counted, not logged again, resubscribed again.
    again = pubsub_clients(redis)
    assert pipelined(redis, ("PUBLISH", CHANNEL, b"x" * (17 * 1024 + 1))) == [b":1\r\n"]
    assert wait_until(lambda: refused() == 2, timeout=10)
    assert wait_until(lambda: pubsub_clients(redis) not in ([], again), timeout=10)
    last = unique("after-the-second")
    publish(redis, message(record(last)))
    assert wait_until(lambda: sidecar.ops(f"/v1/verdicts/{last}")[0] == 200, timeout=10)

    log = sidecar.log()
    assert log.count("invalid record(s) from") == 1, log  # rate-limited: once a minute
    assert "dropped unread" in log and "Traceback" not in log
    assert "redis store DOWN" not in log  # Redis works; one publisher does not
    assert sidecar.metric("tombstone_store_up", store="redis") == 1
    ready = json.loads(sidecar.ops("/readyz")[1])
    assert ready["status"] == "ready" and ready["store"]["up"] is True, ready
    assert sidecar.connect(f"{denied}:{dead_upstream.port}").status == 502
    assert dead_upstream.connections == 0


def test_the_bounded_parser_refuses_a_bulk_string_by_its_length_prefix(
    redis: RedisServer,
) -> None:
    """Against a real redis-server: a reply within the bound is read as redis-py reads it;
    one over it raises OversizedReply with the declared size, without its body having
    been read into memory, and the connection is dropped (the next command gets a new one)."""
    limit = 1024
    big = 16 * 1024 * 1024
    assert pipelined(redis, ("SET", "small", b"s" * limit), ("SET", "big", b"b" * big)) == [
        b"+OK\r\n",
        b"+OK\r\n",
    ]

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis.url, parser_class=bounded_parser(limit), protocol=2)
        try:
            assert await client.get("small") == b"s" * limit
            first = await client.client_id()
            tracemalloc.start()
            try:
                with pytest.raises(OversizedReply) as refusal:
                    await client.get("big")
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert refusal.value.size == big and refusal.value.limit == limit
            assert peak < 1024 * 1024, f"{peak} bytes allocated while refusing {big}"
            assert await client.get("small") == b"s" * limit
            assert await client.client_id() != first  # the refused connection was dropped
        finally:
            await client.aclose()

    asyncio.run(scenario())
    with pytest.raises(ValueError):
        bounded_parser(0)


def test_the_subscriber_is_bounded_and_speaks_resp2_whatever_the_url_asks(
    redis: RedisServer,
) -> None:
    """The store picks the bounded parser for its subscriber itself (hiredis installed or
    not), and RESP2 even for a `?protocol=3` URL, while its other connections keep
    redis-py's defaults."""

    async def scenario() -> None:
        store = RedisStore(redis.url + "?protocol=3", Metrics())
        received: list[Verdict] = []
        await store.start(received.append, lambda name: None)
        try:
            assert store.health().up
            kwargs = store._subscriber.connection_pool.connection_kwargs
            assert issubclass(kwargs["parser_class"], BoundedRESP2Parser)
            assert kwargs["protocol"] == 2
            assert "parser_class" not in store._client.connection_pool.connection_kwargs
            await _arrives(redis, "bounded.hs.test", received)
        finally:
            await store.close()

    asyncio.run(scenario())


def test_after_a_lost_subscription_the_verdict_keys_are_read_again_within_bounds(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages published while the subscriber was away are made up for by reading the
    verdict keys again once resubscribed: valid ones applied, bad ones counted under
    `resync`, and no more than RESYNC_MAX_KEYS of them (here lowered to 8 of 12)."""
    monkeypatch.setattr("sidecar.store.redis.RESYNC_MAX_KEYS", 8)

    async def scenario() -> None:
        store = RedisStore(redis.url, Metrics())
        received: list[Verdict] = []
        await store.start(received.append, lambda name: None)
        try:
            assert store.health().up and not received  # no resync at a start that subscribed
            # Written while the subscription is gone, as another sidecar would (key and
            # message; the messages go nowhere).
            assert redis.command("ACL", "SETUSER", "default", "-subscribe") == b"+OK\r\n"
            assert redis.command("CLIENT", "KILL", "TYPE", "pubsub").startswith(b":1")
            await _eventually(lambda: not store.health().up)
            assert not store.health().up
            names = [f"gap-{index}.hs.test" for index in range(10)]
            for name in names:
                value = json.dumps(record(name))
                assert redis.command("SET", KEY_PREFIX + name, value) == b"+OK\r\n"
                await asyncio.to_thread(publish, redis, message(record(name)))
            redis.command("SET", KEY_PREFIX + "wrong.hs.test", json.dumps(record("other.hs.test")))
            redis.command("SET", KEY_PREFIX + "huge.hs.test", "x" * 100_000)
            redis.command("ACL", "SETUSER", "default", "+subscribe")

            invalid = store.metrics.store_invalid_records.labels("redis", "resync")

            def read_again() -> float:
                return len(received) + float(invalid._value.get())

            for _ in range(400):
                if store.health().up and read_again() >= 8:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # nothing more comes
            assert store.health().up
            applied = {v.destination for v in received}
            assert applied <= set(names)
            assert len(applied) + invalid._value.get() == 8, (applied, invalid._value.get())
            assert len(received) == len(applied)  # each key once
        finally:
            await store.close()

    asyncio.run(scenario())


def test_oversized_messages_that_keep_coming_make_the_resubscriptions_back_off(
    redis: RedisServer,
) -> None:
    """Each oversized message costs a reconnect and a resync: a flood of them does not get
    one every RECONNECT_MIN_SECONDS, the waits double (0.5 s, 1 s, 2 s), and a verdict
    still arrives once the flood stops; the store never reports itself down."""

    async def resubscribed(store: RedisStore, within: float = 15.0) -> float:
        """Seconds until the subscriber listens again after an oversized message."""
        start = time.monotonic()
        while store._listening:  # the drop is seen first
            assert time.monotonic() - start < within
            await asyncio.sleep(0.01)
        while not store._listening:
            assert time.monotonic() - start < within
            await asyncio.sleep(0.01)
        return time.monotonic() - start

    async def scenario() -> None:
        store = RedisStore(redis.url, Metrics())
        received: list[Verdict] = []
        await store.start(received.append, lambda name: None)
        try:
            waits = []
            for _ in range(3):
                oversized = ("PUBLISH", CHANNEL, b"x" * (64 * 1024))
                assert await asyncio.to_thread(pipelined, redis, oversized) == [b":1\r\n"]
                waits.append(await resubscribed(store))
            assert waits[0] >= 0.5 and waits[1] >= 1.0 and waits[2] >= 2.0, waits
            refused = store.metrics.store_invalid_records.labels("redis", "message")
            assert refused._value.get() == 3
            assert store.health().up
            await _arrives(redis, "after-the-flood.hs.test", received)
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_forget_made_during_the_gap_is_replayed_by_the_resync(redis: RedisServer) -> None:
    """Store `one` forgets two names while `two` is resubscribing after an oversized
    message; one of them is judged again right after. `two` missed both messages; its
    resync forgets the first, applies the second's new verdict instead of forgetting it,
    and replays neither an old forget nor `one`'s forgets back to `one`."""

    async def until(done: Callable[[], bool]) -> None:
        for _ in range(400):
            if done():
                return
            await asyncio.sleep(0.025)
        raise AssertionError("not within 10 s")

    def verdict(name: str, observed_at: float) -> Verdict:
        return decode_record(json.dumps(record(name, observed_at=observed_at)).encode())

    async def scenario() -> None:
        one, two = RedisStore(redis.url, Metrics()), RedisStore(redis.url, Metrics())
        got: dict[str, list[str]] = {"one": [], "two": [], "forgot_one": [], "forgot_two": []}
        await one.start(lambda v: got["one"].append(v.destination), got["forgot_one"].append)
        await two.start(lambda v: got["two"].append(v.destination), got["forgot_two"].append)
        try:
            gone, rejudged = "forgotten.hs.test", "rejudged.hs.test"
            stale = "forgotten-long-ago.hs.test"
            old = json.dumps({"forgotten_at": time.time() - 3600, "origin": "elsewhere"})
            redis.command("SET", FORGOTTEN_PREFIX + stale, old)
            redis.command("SET", FORGOTTEN_PREFIX + "junk.hs.test", "[1]")
            for name in (gone, rejudged):
                one.save(verdict(name, time.time()))
            await until(lambda: len(got["two"]) == 2)

            oversized = ("PUBLISH", CHANNEL, b"x" * (64 * 1024))
            assert await asyncio.to_thread(pipelined, redis, oversized) == [b":2\r\n"]
            one.forget(gone)
            one.forget(rejudged)
            await until(lambda: redis.command("EXISTS", KEY_PREFIX + gone) == b":0\r\n")
            one.save(verdict(rejudged, time.time() + 1))  # judged again, after the forget
            await until(lambda: redis.command("EXISTS", KEY_PREFIX + rejudged) == b":1\r\n")

            await until(lambda: got["forgot_two"] == [gone])
            await until(lambda: got["two"].count(rejudged) == 2)  # the new verdict, read again
            await asyncio.sleep(0.5)  # nothing more comes
            assert got["forgot_two"] == [gone]
            assert got["forgot_one"] == []  # its own forgets are not replayed to it
            invalid = two.metrics.store_invalid_records.labels("redis", "resync")
            assert invalid._value.get() >= 1  # the junk marker
            assert one.health().up and two.health().up
        finally:
            await one.close()
            await two.close()

    asyncio.run(scenario())
