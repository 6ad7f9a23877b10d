"""The test world: a real Synapse federating through the real sidecar with fake remotes.

Everything runs inside a private network + mount namespace (see `tests.support.netns`):

    address          what
    127.0.0.1:53     DNS for Synapse (the world's /etc/resolv.conf points here)
    127.0.0.1:5353   the same zone, asked by the sidecar (so each one's queries are counted apart)
    127.0.0.1:8008   Synapse `hs.test` (client + federation API), HTTPS_PROXY = the sidecar
    127.0.0.1:*      the sidecar (`tombstone-sidecar run`): proxy and ops ports are printed
    127.0.1.1        live remote: 443 (well-known), 8448, 8449 (SRV target), 8451 (delegated)
    127.0.2.1        dead remote answering 410 to everything, on 443 and 8448
    127.0.2.2        dead remote refusing connections (nothing listens: RST)
    127.0.2.3        dead remote blackholing connections (accepts, never answers)

Server names (zone `.test`):

    live.test        A 127.0.1.1, no well-known, no SRV: Synapse uses live.test:8448
    srv.test         SRV _matrix-fed._tcp -> fed.srv.test:8449 (A 127.0.1.1)
    wk.test          /.well-known/matrix/server -> fed.wk.test:8451 (A 127.0.1.1)
    txt-gone.test    TXT "v=matrix;gone"                  A 127.0.2.1 (410)
    srv-dot.test     SRV _matrix-fed._tcp -> "."           A 127.0.2.3 (blackhole)
    srv-invalid.test SRV _matrix-fed._tcp -> old.srv-invalid.invalid:8448   A 127.0.2.2 (refuses)
    nx.test          NXDOMAIN
    member-*.test    the same four signals again, for the members of #shared:live.test

A remote's `@carol:<name>` exists, and `#lobby:<name>` is a public room on each live name;
`#shared:live.test` also has a joined `@bob:member-<signal>.test` of each tombstoned kind.
`python -m tests.e2e.world` starts this world interactively (see `main`); the e2e tests
start it through the `world` fixture in conftest.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.e2e.federation import FakeHomeserver
from tests.support.dns_server import DnsServer, Zone
from tests.support.netns import (
    NamespaceError,
    bring_up_loopback,
    check_prerequisites,
    isolate_files,
    reap_namespace,
)
from tests.support.packets import SynCounter
from tests.support.sidecar_process import Sidecar
from tests.support.signing import KEY_ID
from tests.support.synapse_server import Account, Synapse, find_venv
from tests.support.tls_upstream import Blackhole, TestCA, Upstream

ROOT = Path(__file__).resolve().parents[2]
SYNAPSE_NAME = "hs.test"
SYNAPSE_PORT = 8008
SIDECAR_DNS_PORT = 5353
LIVE_IP = "127.0.1.1"
DEAD_410_IP = "127.0.2.1"
DEAD_REFUSE_IP = "127.0.2.2"
DEAD_BLACKHOLE_IP = "127.0.2.3"
DEAD_IPS = (DEAD_410_IP, DEAD_REFUSE_IP, DEAD_BLACKHOLE_IP)
LIVE_PORTS = (443, 8448, 8449, 8451)
DEAD_PORTS = (443, 8448)
TOMBSTONE_TTL = 300
SIDECAR_ARGS_ENV = "SIDECAR_TEST_E2E_SIDECAR_ARGS"  # e.g. "--no-enforce" to see what fails
# The one deviation from Synapse's defaults: a federation transaction (/send) is retried
# 10 times over ~8 minutes (4**n s, capped at 60 s) before Synapse records a backoff;
# here it is retried twice, 1 s apart, so the backoff shows within seconds.
FEDERATION = {"max_long_retries": 2, "max_long_retry_delay": "1s"}

HOSTS = """\
127.0.0.1 localhost hs.test
::1 localhost ip6-localhost ip6-loopback
"""


@dataclass(frozen=True)
class Live:
    name: str
    how: str  # how Synapse finds it: plain, srv, well-known


@dataclass(frozen=True)
class Tombstone:
    name: str
    signal: str  # the sidecar's signal code
    dead_ip: str | None  # where its A record points (None: the name does not exist)

    @property
    def user(self) -> str:
        return f"@carol:{self.name}"

    @property
    def alias(self) -> str:
        return f"#lobby:{self.name}"

    @property
    def room_id(self) -> str:
        return f"!lobby:{self.name}"


LIVES = (Live("live.test", "plain"), Live("srv.test", "srv"), Live("wk.test", "well-known"))
TOMBSTONES = (
    Tombstone("txt-gone.test", "dns_txt_gone", DEAD_410_IP),
    Tombstone("srv-dot.test", "dns_srv_dot", DEAD_BLACKHOLE_IP),
    Tombstone("srv-invalid.test", "invalid_tld", DEAD_REFUSE_IP),
    Tombstone("nx.test", "nxdomain", None),
)
# The same four signals again, for the `@bob`s of `#shared:live.test` (scenario 3), so
# that room's transactions start from a clean backoff state.
MEMBER_TOMBSTONES = (
    Tombstone("member-txt.test", "dns_txt_gone", DEAD_410_IP),
    Tombstone("member-dot.test", "dns_srv_dot", DEAD_BLACKHOLE_IP),
    Tombstone("member-invalid.test", "invalid_tld", DEAD_REFUSE_IP),
    Tombstone("member-nx.test", "nxdomain", None),
)


def publish(zone: Zone, tombstone: Tombstone, ttl: int = TOMBSTONE_TTL) -> None:
    """The tombstone's DNS records, with an A record to its dead remote (if it has one)."""
    name = tombstone.name
    if tombstone.dead_ip is not None:
        zone.add(name, "A", tombstone.dead_ip, ttl=ttl)
    if tombstone.signal == "dns_txt_gone":
        zone.add(name, "TXT", "v=matrix;gone", ttl=ttl)
    elif tombstone.signal == "dns_srv_dot":
        zone.add(f"_matrix-fed._tcp.{name}", "SRV", "0 0 0 .", ttl=ttl)
    elif tombstone.signal == "invalid_tld":
        target = f"old.{name.removesuffix('.test')}.invalid"
        zone.add(f"_matrix-fed._tcp.{name}", "SRV", f"10 0 8448 {target}", ttl=ttl)
    elif tombstone.signal == "nxdomain":
        zone.nxdomain(name, soa_minimum=ttl, soa_ttl=ttl)
    else:
        raise ValueError(f"no DNS form for signal {tombstone.signal}")


def build_zone(zone: Zone) -> None:
    """Publish every live and tombstoned name of the world."""
    zone.add("test", "SOA", "ns1.test hostmaster.test 1 3600 600 86400 300", ttl=300)
    zone.add(SYNAPSE_NAME, "A", "127.0.0.1")
    for name in ("live.test", "srv.test", "wk.test", "fed.srv.test", "fed.wk.test"):
        zone.add(name, "A", LIVE_IP)
    zone.add("_matrix-fed._tcp.srv.test", "SRV", "10 0 8449 fed.srv.test")
    for tombstone in (*TOMBSTONES, *MEMBER_TOMBSTONES):
        publish(zone, tombstone)


class World:
    """Starts and stops every piece; all of it must already run inside the namespaces.

    `command_prefix` runs a child process inside the world's namespaces (`nsenter ...`
    when the caller only joined the network namespace; empty when the caller is inside).
    """

    def __init__(
        self,
        directory: Path,
        *,
        command_prefix: Sequence[str] = (),
        sidecar_args: Sequence[str] = (),
        synapse_venv: Path | None = None,
    ) -> None:
        self.directory = directory
        self.command_prefix = list(command_prefix)
        self.sidecar_args = list(sidecar_args)
        self.synapse_venv = synapse_venv or find_venv(ROOT)
        self.zone = Zone()
        build_zone(self.zone)
        self.ca = TestCA(directory / "ca")
        self.live = FakeHomeserver(
            {
                "live.test": "live.test",
                "srv.test": "srv.test",
                "fed.srv.test": "srv.test",
                "wk.test": "wk.test",
                "fed.wk.test": "wk.test",
            },
            well_known={"wk.test": "fed.wk.test:8451"},
            shared_with=tuple(t.name for t in MEMBER_TOMBSTONES),
        )
        self._stoppers: list[Any] = []
        self.dns: DnsServer | None = None  # Synapse's resolver (127.0.0.1:53)
        self.sidecar_dns: DnsServer | None = None
        self.syns: SynCounter | None = None
        self.live_upstreams: list[Upstream] = []
        self.dead_410: list[Upstream] = []
        self.blackholes: list[Blackhole] = []
        self.sidecar: Sidecar | None = None
        self.sidecars: list[Sidecar] = []
        self.synapse: Synapse | None = None
        self.synapses: list[Synapse] = []
        self.account: Account | None = None
        self.timings: dict[str, float] = {}

    # -- lifecycle ------------------------------------------------------------------------

    def _started(self, thing: Any) -> Any:
        self._stoppers.append(thing)
        return thing

    def start(self) -> World:
        began = time.monotonic()
        self.syns = self._started(SynCounter().start())
        self.dns = self._started(DnsServer(self.zone, host="127.0.0.1", port=53).start())
        self.sidecar_dns = self._started(
            DnsServer(self.zone, host="127.0.0.1", port=SIDECAR_DNS_PORT).start()
        )
        names = ["live.test", "srv.test", "wk.test", "fed.srv.test", "fed.wk.test"]
        for port in LIVE_PORTS:
            upstream = Upstream(self.ca, names, host=LIVE_IP, port=port, handler=self.live.handler)
            self.live_upstreams.append(self._started(upstream.start()))
        dead_names = [t.name for t in (*TOMBSTONES, *MEMBER_TOMBSTONES)]
        body = b'{"errcode":"M_UNKNOWN","error":"this server is gone"}'
        for port in DEAD_PORTS:
            gone = Upstream(self.ca, dead_names, host=DEAD_410_IP, port=port, status=410, body=body)
            self.dead_410.append(self._started(gone.start()))
            self.blackholes.append(self._started(Blackhole(DEAD_BLACKHOLE_IP, port).start()))
        self.timings["remotes"] = time.monotonic() - began
        began = time.monotonic()
        self.sidecar = self.start_sidecar(self.sidecar_args)
        self.timings["sidecar"] = time.monotonic() - began
        began = time.monotonic()
        self.synapse = self.start_synapse(
            "synapse", SYNAPSE_NAME, SYNAPSE_PORT, self.sidecar.proxy_url, federation=FEDERATION
        )
        self.timings["synapse"] = time.monotonic() - began
        self.account = self.synapse.register("alice", admin=True)
        return self

    def start_sidecar(self, args: Sequence[str] = ()) -> Sidecar:
        sidecar = Sidecar(
            SIDECAR_DNS_PORT,
            # --no-probe: the pass-through scenarios count every connection the remotes get
            ["--allow-address", "127.0.0.0/8", "--min-ttl", "1s", "--no-probe", *args],
            log_dir=self.directory,
        )
        self.sidecars.append(sidecar)
        self._started(sidecar)
        return sidecar.start()

    def start_synapse(
        self,
        label: str,
        server_name: str,
        port: int,
        proxy_url: str,
        *,
        ca_file: Path | None = None,
        **extra: Any,
    ) -> Synapse:
        """A Synapse in the world (the main one, or another for a side experiment).

        `ca_file` replaces the world's test CA as what Synapse trusts for federation (for
        an intercepting sidecar: a bundle with the sidecar's own CA).

        Its only key notary is the live remote (as matrix.org is for most servers), which
        vouches for the decommissioned servers' keys too: without it Synapse could not
        verify their members' events in `#shared:live.test`.
        """
        notary = self.live.notary
        extra.setdefault(
            "trusted_key_servers",
            [
                {
                    "server_name": notary,
                    "verify_keys": {KEY_ID: self.live.keys[notary].public_b64},
                }
            ],
        )
        synapse = Synapse(
            self.synapse_venv,
            self.directory / label,
            server_name=server_name,
            port=port,
            proxy_url=proxy_url,
            ca_file=ca_file or self.ca.ca_pem_path,
            command_prefix=self.command_prefix,
            extra_config=extra,
        )
        self.synapses.append(synapse)
        self._started(synapse)
        return synapse.start()

    def stop(self) -> None:
        """Stop everything that was started, newest first; never raises."""
        while self._stoppers:
            thing = self._stoppers.pop()
            try:
                thing.stop()
            except Exception as e:  # keep stopping the rest
                print(f"world: stopping {thing!r} failed: {e}", file=sys.stderr)

    # -- observation ---------------------------------------------------------------------

    def dead_connections(self) -> dict[str, int]:
        """Connection attempts (SYNs) to each dead remote, and what the 410 one received."""
        assert self.syns is not None
        return {
            "410 SYNs": self.syns.count(DEAD_410_IP),
            "refusing SYNs": self.syns.count(DEAD_REFUSE_IP),
            "blackhole SYNs": self.syns.count(DEAD_BLACKHOLE_IP),
            "410 requests": sum(len(u.requests) for u in self.dead_410),
            "blackhole accepts": sum(b.connections for b in self.blackholes),
        }

    def new_dead_connections(self, before: dict[str, int]) -> dict[str, int]:
        """What reached the dead remotes since `before` (a `dead_connections()`); {} if none."""
        now = self.dead_connections()
        return {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}

    def live_requests(self) -> list[tuple[int, str, str]]:
        """(port, Host, request line) of every request the live remote received."""
        return [
            (u.port, r.headers.get("host", ""), f"{r.method} {r.path}")
            for u in self.live_upstreams
            for r in u.requests
        ]

    def logs(self) -> dict[str, str]:
        """Every piece's log, for a failing test's report."""
        logs: dict[str, str] = {}
        for synapse in self.synapses:
            logs[f"{synapse.server_name} log"] = synapse.log_text()
            logs[f"{synapse.server_name} stdout"] = synapse.process.log_text()
        for sidecar in self.sidecars:
            logs[f"sidecar {sidecar.proxy_port} log"] = sidecar.log()
        for label, dns in (("dns (synapse)", self.dns), ("dns (sidecar)", self.sidecar_dns)):
            if dns is not None:
                logs[label] = "\n".join(f"{q.transport} {q.rrtype} {q.name}" for q in dns.query_log)
        remotes = [f"live {port} {host} {line}" for port, host, line in self.live_requests()]
        if self.syns is not None:
            remotes += [f"dead {k}: {v}" for k, v in self.dead_connections().items()]
        logs["remotes"] = "\n".join(remotes)
        return logs


# -- interactive launcher -------------------------------------------------------------------

INSIDE_ENV = "SIDECAR_TEST_WORLD_INSIDE"


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/world",
        description="Start the e2e test world interactively: DNS, fake remotes, the sidecar "
        "and a real Synapse in a private network namespace. Needs root.",
    )
    parser.add_argument(
        "sidecar_args",
        nargs=argparse.REMAINDER,
        help="extra `tombstone-sidecar run` arguments after `--`, e.g. -- --no-enforce",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    extra = [a for a in args.sidecar_args if a != "--"]
    if os.environ.get(INSIDE_ENV) != "1":
        try:
            check_prerequisites()
        except NamespaceError as e:
            print(f"scripts/world: {e}", file=sys.stderr)
            return 2
        env = {**os.environ, INSIDE_ENV: "1"}
        argv_inside = ["unshare", "--net", "--mount", sys.executable, "-m", "tests.e2e.world"]
        inner = subprocess.Popen([*argv_inside, "--", *extra], env=env, cwd=ROOT)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the world; it stops itself
        return inner.wait()
    directory = Path(tempfile.mkdtemp(prefix="tombstone-world-"))
    etc = directory / "etc"
    etc.mkdir()
    (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:2\n")
    (etc / "hosts").write_text(HOSTS)
    isolate_files(etc)
    bring_up_loopback()
    world = World(directory, sidecar_args=extra)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        world.start()
        print(_summary(world), flush=True)
        while not stop.wait(1):
            if world.sidecar and not world.sidecar.process.alive:
                print("world: the sidecar exited; stopping", file=sys.stderr)
                break
            if world.synapse and not world.synapse.process.alive:
                print("world: Synapse exited; stopping", file=sys.stderr)
                break
    finally:
        print("world: stopping", file=sys.stderr)
        world.stop()
        reap_namespace()  # anything a piece left behind
        if os.environ.get("SIDECAR_TEST_WORLD_KEEP") != "1":
            shutil.rmtree(directory, ignore_errors=True)
    return 0


def _summary(world: World) -> str:
    assert world.sidecar and world.synapse and world.account
    enter = f"nsenter --target {os.getpid()} --net --mount"
    token = world.account.access_token
    lines = [
        "",
        f"tombstone test world is up (pid {os.getpid()}, files in {world.directory})",
        "",
        f"  Synapse      {world.synapse.base_url}  server name {SYNAPSE_NAME}, "
        f"log {world.synapse.log_path}",
        f"  user         {world.account.user_id}  password {world.account.password}",
        f"  token        {token}",
        f"  sidecar      {world.sidecar.proxy_url}  log {world.sidecar.process.log_path}",
        f"  sidecar ops  http://127.0.0.1:{world.sidecar.ops_port}/metrics  /v1/verdicts",
        "  DNS          127.0.0.1:53 (Synapse), 127.0.0.1:5353 (sidecar)",
        "  live names   " + ", ".join(f"{lv.name} ({lv.how})" for lv in LIVES),
        "  tombstoned   " + ", ".join(f"{t.name} ({t.signal})" for t in TOMBSTONES),
        "",
        "Everything listens inside a private network namespace. Enter it with:",
        f"  sudo {enter} bash",
        "then, for example:",
        f"  curl -s -H 'Authorization: Bearer {token}' \\",
        f"    {world.synapse.base_url}/_matrix/client/v3/profile/@carol:txt-gone.test",
        f"  curl -s -X POST -H 'Authorization: Bearer {token}' -d '{{}}' \\",
        f"    {world.synapse.base_url}/_matrix/client/v3/join/%23lobby:live.test",
        f"  curl -s http://127.0.0.1:{world.sidecar.ops_port}/metrics | grep tombstone_suppressed",
        "",
        f"Stop with Ctrl-C (or: kill {os.getpid()}). SIDECAR_TEST_WORLD_KEEP=1 keeps the files.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
