"""Verdicts that last and are shared: restarts, broken state files, Redis, ops API, lists.

Everything runs for real: the sidecar processes, their SQLite files, a redis-server that
the tests kill and restart, and the ops API and CLI over HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import DEAD_IP, LIVE_IP
from tests.integration.harness import Sidecar, sidecar_command
from tests.support.dns_server import DnsServer, Zone
from tests.support.procs import wait_until
from tests.support.redis_server import RedisServer
from tests.support.tls_upstream import TestCA, Upstream

TOKEN = "0123456789abcdef0123456789abcdef"


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


def request(sidecar: Sidecar, method: str, path: str, token: str | None = None,
            body: dict[str, object] | None = None) -> tuple[int, dict[str, object]]:  # fmt: skip
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{sidecar.ops_port}{path}", data=data,
                                 method=method)  # fmt: skip
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
    status, verdict = request(sidecar, "PUT", f"/v1/verdicts/{name}", TOKEN,
                              {"ttl": "7d", "comment": "shut down by its admins"})  # fmt: skip
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
        return subprocess.run([*sidecar_command(), "verdicts", *args, *base], capture_output=True,
                              text=True, timeout=30, check=False)  # fmt: skip

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
    unreachable = subprocess.run([*sidecar_command(), "verdicts", "list", "--ops-listen",
                                  "127.0.0.1:1"], capture_output=True, text=True, timeout=30,
                                 check=False)  # fmt: skip
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
        [*sidecar_command(), "verdicts", "list", "--sort", "suppressed", "--state", "gone",
         "--json", "--ops-listen", f"127.0.0.1:{sidecar.ops_port}"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip

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
    sidecar = Sidecar(dns_server.port, ["--allow-address", "127.0.0.0/8", "--refusal", "status",
                                        "--state-dir", str(state)], log_dir=tmp_path)  # fmt: skip
    mount = 'mount -t tmpfs -o size=64k tmpfs "$0" && exec "$@"'
    sidecar.argv[:0] = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount,
                        str(state)]  # fmt: skip
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
        assert wait_until(lambda: sidecar.metric("tombstone_store_up", store="sqlite") == 0,
                          timeout=10)  # fmt: skip
        ready = json.loads(sidecar.ops("/readyz")[1])
        assert ready["status"] == "ready" and "full" in ready["store"]["detail"]
        assert sidecar.metric("tombstone_store_errors_total", store="sqlite", op="write") >= 1
        assert sidecar.connect(f"{names[0]}:{dead_upstream.port}").status == 502  # from memory

        assert sidecar.process.proc is not None
        grow = ["nsenter", "--target", str(sidecar.process.proc.pid), "--mount", "mount", "-o",
                "remount,size=16m", str(state)]  # fmt: skip
        subprocess.run(grow, check=True, timeout=10)
        assert wait_until(lambda: sidecar.metric("tombstone_store_up", store="sqlite") == 1,
                          timeout=20)  # fmt: skip
        assert "sqlite store up" in sidecar.log()
    finally:
        sidecar.stop()
    assert dead_upstream.connections == 0
