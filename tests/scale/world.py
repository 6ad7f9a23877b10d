"""The scale world: a real Synapse and N fake remote homeservers, in a private namespace.

Like tests/e2e's world, everything runs inside a private network + mount namespace (the
holder of tests/support/netns.py), so the DNS server may bind :53 and the fakes :443 and
:8448, and the host is never touched. The pieces:

    127.0.0.1:53     DNS for Synapse: the generated zone of every remote name
    127.0.0.1:5353   the same zone for the sidecar (its queries counted apart)
    127.0.0.1:8008   Synapse `hs.test` (SQLite), direct or behind the sidecar
    127.0.0.1:*      the sidecar, when the mode has one
    127.0.0.1:8099   the fake federation's control API
    127.0.0.2:53     the same zone for the plain mitmdump (its own /etc/resolv.conf)
    127.0.1.1, 127.2x.x.y  the fake federation (tests/scale/fakefed.py, one process);
                     every dead server at an address of its own: tests/scale/population.py

The blackholed kinds' /16s get an iptables rule in the namespace dropping every SYN in
INPUT; the SYN counter (an AF_PACKET socket on `lo`) sees each attempt before the rule
drops it, and tests/scale/accounting.py attributes each to its name by address.

Modes: `direct` (Synapse alone; it dials the fakes itself, 127.0.0.0/8 allowed),
`mitmdump` (a bare mitmdump, no addon, passing every tunnel through untouched:
`--ignore-hosts .*`, as tests/bench runs its pass-through baseline), `sidecar`
(pass-through), `intercept` (the sidecar intercepting; Synapse trusts its CA).

With `pin=True` Synapse runs on CPU 0 and everything else (the proxy, the fake federation,
the DNS servers, this process) on CPU 1, so the proxy does not compete with Synapse.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from tests.scale import fakefed
from tests.scale.accounting import Backoffs, DeadAccount, Verdicts
from tests.scale.population import (
    BLACKHOLE_KINDS,
    DEAD_NETWORK,
    HUB,
    Population,
    build_zone,
    kind_network,
)
from tests.support.dns_server import DnsServer, Zone
from tests.support.netns import Namespace
from tests.support.packets import SynCounter
from tests.support.procs import ManagedProcess, free_port
from tests.support.sidecar_process import Sidecar, mitmdump_path
from tests.support.signing import KEY_ID
from tests.support.synapse_server import Account, Synapse, count_critical, find_venv
from tests.support.tls_upstream import TestCA

ROOT = Path(__file__).resolve().parents[2]
SYNAPSE_NAME = "hs.test"
SYNAPSE_PORT = 8008
SIDECAR_DNS_PORT = 5353
MITMDUMP_DNS_HOST = "127.0.0.2"  # mitmdump asks the system resolver: port 53 only
CONTROL_PORT = 8099
MODES = ("direct", "mitmdump", "sidecar", "intercept")
PROXY_START_TIMEOUT = 30.0
# The world's DNS servers are threads of the test process: on a loaded machine (2 cores,
# Synapse, the proxy and the fake federation busy with a join) an answer took over the
# tests' usual 2 s and the sidecar failed open on DNS-dead names (26 undecided connections
# at N = 200 in intercept mode). A real resolver answers in milliseconds; this keeps the
# harness's slowness out of the verdicts (`sidecar_counters.undecided` shows what is left).
SIDECAR_DNS_TIMEOUT = "10s"
# Each DNS server's UDP receive buffer: a join makes Synapse and the proxy ask about every
# name at once (5 questions a name for the sidecar), more than the kernel's default of
# ~200 KB holds while the server's threads wait for the CPU; net.core.rmem_max caps it.
DNS_UDP_BUFFER = 4 * 1024 * 1024
SYNAPSE_CPU = 0  # with pin=True: Synapse here, everything else on OTHERS_CPU
OTHERS_CPU = 1
HOSTS = """\
127.0.0.1 localhost hs.test
::1 localhost ip6-localhost ip6-loopback
"""
# Building and signing the room takes about 0.2 ms per member; the rest is start-up.
FAKEFED_START_SECONDS = 30.0
FAKEFED_START_PER_SERVER = 0.002
CONTROL_TIMEOUT = 30.0
# Synapse keeps a connection open to every destination, and the sidecar holds two file
# descriptors per tunnel: at 10,000 servers the common limit of 20,000 ran out in both
# ("Too many open files" on connect). Children inherit the limit raised here.
FD_LIMIT = 131072


def raise_fd_limit(wanted: int = FD_LIMIT) -> int:
    """Raise this process's open-file limit (soft and, as root, hard) to `wanted`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):  # not root: as far as the hard limit goes
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def process_usage(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) and RSS now and at its peak (kB) of one process."""
    ticks = 100.0  # os.sysconf("SC_CLK_TCK") on every Linux this runs on
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    usage = {"cpu_seconds": (int(fields[11]) + int(fields[12])) / ticks}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            usage[f"{key.lower()}_kb"] = float(value.split()[0])
    return usage


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus` (threads it starts later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task.name), cpus)


class ScaleWorld:
    """Start with `start()`, stop with `stop()` (never raises); the calling thread enters
    the world's network namespace and leaves it at `stop()`."""

    def __init__(
        self,
        directory: Path,
        population: Population,
        *,
        mode: str = "sidecar",
        partial_state: bool = False,
        sidecar_args: Sequence[str] = (),
        synapse_venv: Path | None = None,
        synapse_config: dict[str, Any] | None = None,
        pin_cpus: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
        self.directory = directory
        self.population = population
        self.mode = mode
        self.partial_state = partial_state
        self.sidecar_args = list(sidecar_args)
        self.synapse_venv = synapse_venv or find_venv(ROOT)
        self.synapse_config = dict(synapse_config or {})
        self.pin_cpus = pin_cpus
        self._affinity: set[int] | None = None
        self.namespace = Namespace(directory)
        self.zone = Zone()
        build_zone(self.zone, population, SYNAPSE_NAME)
        self.ca = TestCA(directory / "ca")
        self._stoppers: list[Any] = []
        self.dns: DnsServer | None = None
        self.sidecar_dns: DnsServer | None = None
        self.syns: SynCounter | None = None
        self.fakefed: ManagedProcess | None = None
        self.sidecar: Sidecar | None = None
        self.mitmdump: ManagedProcess | None = None
        self.mitmdump_dns: DnsServer | None = None
        self.synapse: Synapse | None = None
        self.account: Account | None = None
        self.timings: dict[str, float] = {}
        self._iptables = "iptables"
        self.fd_limit = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def _started(self, thing: Any) -> Any:
        self._stoppers.append(thing)
        return thing

    def start(self) -> ScaleWorld:
        self.fd_limit = raise_fd_limit()
        if self.pin_cpus:
            if len(os.sched_getaffinity(0)) < 2:
                raise RuntimeError("pinning needs 2 CPUs: Synapse on one, the rest on the other")
            self._affinity = os.sched_getaffinity(0)
            pin(os.getpid(), {OTHERS_CPU})  # what this process starts inherits it
        self.namespace.start(HOSTS)
        self.namespace.enter_net()
        began = time.monotonic()
        self.syns = self._started(SynCounter(watch=DEAD_NETWORK).start())
        self._blackhole()
        self.dns = self._started(self._dns_server(53).start())
        self.sidecar_dns = self._started(self._dns_server(SIDECAR_DNS_PORT).start())
        self.fakefed = self._started(self._start_fakefed())
        self.timings["remotes"] = time.monotonic() - began
        proxy_url = ""
        ca_file = self.ca.ca_pem_path
        if self.mode == "mitmdump":
            began = time.monotonic()
            proxy_url = self._start_mitmdump()
            self.timings["mitmdump"] = time.monotonic() - began
        elif self.mode != "direct":
            began = time.monotonic()
            # The sidecar's defaults (probes on: they learn the 410s), trusting the world's
            # CA for its own requests and dialling loopback.
            ca = str(self.ca.ca_pem_path)
            args = [
                "--allow-address",
                "127.0.0.0/8",
                "--upstream-ca",
                ca,
                "--dns-timeout",
                SIDECAR_DNS_TIMEOUT,
                *self.sidecar_args,
            ]
            if self.mode == "intercept":
                args += ["--mode", "intercept"]
            self.sidecar = self._started(Sidecar(SIDECAR_DNS_PORT, args, log_dir=self.directory))
            self.sidecar.start()
            proxy_url = self.sidecar.proxy_url
            if self.mode == "intercept":
                ca_file = self._bundle(self.sidecar)
            self.timings["sidecar"] = time.monotonic() - began
        began = time.monotonic()
        self.synapse = self._started(self._synapse(proxy_url, ca_file))
        self.synapse.start(timeout=120)
        self.timings["synapse"] = time.monotonic() - began
        self.account = self.synapse.register("alice", admin=True)
        return self

    def _dns_server(self, port: int, host: str = "127.0.0.1") -> DnsServer:
        return DnsServer(self.zone, host=host, port=port, udp_buffer_bytes=DNS_UDP_BUFFER)

    def _start_mitmdump(self) -> str:
        """A bare mitmdump (no addon) that tunnels every CONNECT untouched, resolving names
        through its own DNS server (counted apart from Synapse's): a mount namespace of its
        own binds a resolv.conf naming it over /etc/resolv.conf."""
        self.mitmdump_dns = self._started(self._dns_server(53, MITMDUMP_DNS_HOST).start())
        resolv = self.directory / "mitmdump-resolv.conf"
        resolv.write_text(f"nameserver {MITMDUMP_DNS_HOST}\noptions timeout:2 attempts:2\n")
        confdir = self.directory / "mitmdump"
        confdir.mkdir(exist_ok=True)
        port = free_port()
        argv = [
            mitmdump_path(),
            "-q",
            "--listen-host",
            "127.0.0.1",
            "-p",
            str(port),
            "--set",
            f"confdir={confdir}",
            "--set",
            "connection_strategy=lazy",
            "--ignore-hosts",
            ".*",
        ]
        bind = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
        command = ["unshare", "--mount", "--", "sh", "-c", bind, str(resolv), *argv]
        process = ManagedProcess(command, log_path=self.directory / "mitmdump.log")
        self.mitmdump = self._started(process)
        process.start()
        process.wait_for_port(port, timeout=PROXY_START_TIMEOUT)
        return f"http://127.0.0.1:{port}"

    def _blackhole(self) -> None:
        """Drop every SYN to the blackholed kinds' addresses (INPUT: the SYN counter saw it)."""
        path = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
        tool = shutil.which("iptables", path=path)
        if tool is None:
            raise RuntimeError("the scale world needs iptables (apt-get install iptables)")
        for kind in BLACKHOLE_KINDS:
            rule = ["-A", "INPUT", "-d", kind_network(kind), "-p", "tcp", "--syn", "-j", "DROP"]
            subprocess.run(self.namespace.command([tool, *rule]), check=True, timeout=30)
        self._iptables = tool

    def dropped_syns(self) -> int:
        """What the blackhole rules dropped, from their own packet counters."""
        listing = subprocess.run(
            self.namespace.command([self._iptables, "-L", "INPUT", "-v", "-x", "-n"]),
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        return sum(int(line.split()[0]) for line in listing.splitlines() if " DROP " in line)

    def _start_fakefed(self) -> ManagedProcess:
        chain, key = self.ca.write_leaf(["*.fed.test", "fed.test"], stem="fed")
        argv = [
            sys.executable,
            "-m",
            "tests.scale.fakefed",
            "--count",
            str(self.population.count),
            "--dead-share",
            str(self.population.dead_share),
            "--seed",
            self.population.seed,
            "--cert",
            str(chain),
            "--key",
            str(key),
            "--control-port",
            str(CONTROL_PORT),
        ]
        if self.partial_state:
            argv.append("--partial-state")
        process = ManagedProcess(argv, cwd=ROOT, log_path=self.directory / "fakefed.log")
        process.start()
        timeout = FAKEFED_START_SECONDS + FAKEFED_START_PER_SERVER * self.population.count
        process.wait_for_log(fakefed.READY_LINE, timeout=timeout)
        return process

    def _bundle(self, sidecar: Sidecar) -> Path:
        """The intercepting sidecar's CA and the world's: what Synapse trusts behind it."""
        ours = (sidecar.state_dir / "ca" / "mitmproxy-ca-cert.pem").read_text()
        bundle = self.directory / "intercept-ca-bundle.pem"
        bundle.write_text(ours.rstrip("\n") + "\n" + self.ca.ca_pem.decode())
        return bundle

    def _synapse(self, proxy_url: str, ca_file: Path) -> Synapse:
        hub_key = self.population.key(HUB)
        config: dict[str, Any] = {
            # The hub is the world's notary (as matrix.org is for most servers): it vouches
            # for every member's key, the dead servers' too.
            "trusted_key_servers": [
                {"server_name": HUB, "verify_keys": {KEY_ID: hub_key.public_b64}}
            ],
            # Direct mode dials the fakes on loopback, which Synapse refuses by default.
            "ip_range_whitelist": ["127.0.0.0/8"],
            **self.synapse_config,
        }
        return Synapse(
            self.synapse_venv,
            self.directory / "synapse",
            server_name=SYNAPSE_NAME,
            port=SYNAPSE_PORT,
            proxy_url=proxy_url,
            ca_file=ca_file,
            command_prefix=self.namespace.command(
                ["taskset", "-c", str(SYNAPSE_CPU)] if self.pin_cpus else []
            ),
            extra_config=config,
        )

    def stop(self) -> None:
        """Stop everything that was started, newest first, then the namespace."""
        while self._stoppers:
            thing = self._stoppers.pop()
            try:
                thing.stop()
            except Exception as e:  # keep stopping the rest
                print(f"scale world: stopping {thing!r} failed: {e}", file=sys.stderr)
        self.namespace.stop()
        if self._affinity is not None:
            pin(os.getpid(), self._affinity)
            self._affinity = None

    # -- observation -----------------------------------------------------------------------

    def control(self, path: str, method: str = "GET") -> Any:
        """The fake federation's control API (tests/scale/fakefed.py)."""
        url = f"http://127.0.0.1:{CONTROL_PORT}{path}"
        with httpx.Client(trust_env=False, timeout=CONTROL_TIMEOUT) as client:
            response = client.request(method, url)
            response.raise_for_status()
            return response.json()

    def dead_account(self, since: float = 0.0) -> DeadAccount:
        """Every connection attempt and request that reached a dead server (from `since`,
        epoch seconds), by name, the sidecar's verdicts and Synapse's backoffs from their logs."""
        assert self.syns is not None and self.synapse is not None
        account = DeadAccount(self.population, since=since)
        account.backoffs = Backoffs.parse(self.synapse.log_text())
        account.add_attempts(self.syns.attempt_times())
        account.add_payload(self.syns.payload_times())
        account.add_requests(self.control("/gone"))
        if self.sidecar is not None:
            account.verdicts = Verdicts.parse(self.sidecar.log())
        return account

    def dead_reached(self, since: float = 0.0) -> dict[str, Any]:
        """Per dead kind: SYNs and requests, and with a sidecar what came after its first
        gone verdict on each name (tests/scale/accounting.py)."""
        reached = self.dead_account(since).summary()
        stats = self.control("/stats")
        reached["requests_by_kind_port_agent"] = dict(sorted(stats["gone_kinds"].items()))
        reached["syns_dropped_by_blackhole_rules"] = self.dropped_syns()
        return reached

    def usage(self) -> dict[str, dict[str, float]]:
        """CPU and memory of Synapse, the sidecar and the fake federation."""
        found: dict[str, dict[str, float]] = {}
        if self.synapse is not None and self.synapse.process.alive:
            found["synapse"] = process_usage(self.synapse.process.pid)
        if self.sidecar is not None and self.sidecar.process.alive:
            found["sidecar"] = process_usage(self.sidecar.process.pid)
        if self.mitmdump is not None and self.mitmdump.alive:
            found["mitmdump"] = process_usage(self.mitmdump.pid)
        stats = self.control("/stats")
        found["fakefed"] = {
            "cpu_seconds": stats["cpu_seconds"],
            "vmrss_kb": stats["rss_kb"],
            "vmhwm_kb": stats["max_rss_kb"],
        }
        return found

    def dns_queries(self) -> dict[str, int]:
        """Queries each asker sent: Synapse, the sidecar, the plain mitmdump."""
        assert self.dns is not None and self.sidecar_dns is not None
        found = {"synapse": len(self.dns.query_log), "sidecar": len(self.sidecar_dns.query_log)}
        if self.mitmdump_dns is not None:
            found["mitmdump"] = len(self.mitmdump_dns.query_log)
        return found

    def sidecar_counters(self) -> dict[str, float]:
        """From the sidecar's metrics: connections forwarded without a verdict because DNS did
        not answer (fail open: the world's DNS server too slow), and its probes by result."""
        if self.sidecar is None or not self.sidecar.process.alive:
            return {}
        found: dict[str, float] = {}
        for (name, labels), value in self.sidecar.metrics().items():
            if name == "tombstone_undecided_total":
                found["undecided"] = found.get("undecided", 0.0) + value
            elif name == "tombstone_probes_total":
                result = dict(labels).get("result", "")
                found[f"probes {result}"] = found.get(f"probes {result}", 0.0) + value
        return found

    def synapse_log_counts(self) -> dict[str, int]:
        assert self.synapse is not None
        return count_critical(self.synapse.log_text())

    def logs(self) -> dict[str, str]:
        """Every piece's log, for a failing test's report."""
        logs: dict[str, str] = {}
        if self.synapse is not None:
            logs["synapse log"] = self.synapse.log_text()
            logs["synapse stdout"] = self.synapse.process.log_text()
        if self.sidecar is not None:
            logs["sidecar log"] = self.sidecar.log()
        if self.mitmdump is not None:
            logs["mitmdump log"] = self.mitmdump.log_text()
        if self.fakefed is not None:
            logs["fakefed log"] = self.fakefed.log_text()
            with contextlib.suppress(Exception):
                logs["fakefed stats"] = json.dumps(self.control("/stats"), indent=1)
        return logs
