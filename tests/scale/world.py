"""The scale world: a real Synapse and N fake remote homeservers, in a private namespace.

Like tests/e2e's world, everything runs inside a private network + mount namespace (the
holder of tests/support/netns.py), so the DNS server may bind :53 and the fakes :443 and
:8448, and the host is never touched. The pieces:

    127.0.0.1:53     DNS for Synapse: the generated zone of every remote name
    127.0.0.1:5353   the same zone for the sidecar (its queries counted apart)
    127.0.0.1:8008   Synapse `hs.test` (SQLite), direct or behind the sidecar
    127.0.0.1:*      the sidecar, when the mode has one
    127.0.0.1:8099   the fake federation's control API
    127.0.1.1, 127.0.3.x  the fake federation (tests/scale/fakefed.py, one process);
                     where each kind of server lives: tests/scale/population.py

Blackholed addresses get an iptables rule in the namespace dropping every SYN in INPUT; the
SYN counter (an AF_PACKET socket on `lo`) sees each attempt before the rule drops it.

Modes: `direct` (Synapse alone; it dials the fakes itself, 127.0.0.0/8 allowed),
`sidecar` (pass-through), `intercept` (the sidecar intercepting; Synapse trusts its CA).
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
from tests.scale.population import BLACKHOLE_IPS, DEAD_KINDS, HUB, Population, build_zone
from tests.support.dns_server import DnsServer, Zone
from tests.support.netns import Namespace
from tests.support.packets import SynCounter
from tests.support.procs import ManagedProcess
from tests.support.sidecar_process import Sidecar
from tests.support.signing import KEY_ID
from tests.support.synapse_server import Account, Synapse, count_critical, find_venv
from tests.support.tls_upstream import TestCA

ROOT = Path(__file__).resolve().parents[2]
SYNAPSE_NAME = "hs.test"
SYNAPSE_PORT = 8008
SIDECAR_DNS_PORT = 5353
CONTROL_PORT = 8099
MODES = ("direct", "sidecar", "intercept")
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
        self.namespace.start(HOSTS)
        self.namespace.enter_net()
        began = time.monotonic()
        self.syns = self._started(SynCounter().start())
        self._blackhole()
        self.dns = self._started(DnsServer(self.zone, port=53).start())
        self.sidecar_dns = self._started(DnsServer(self.zone, port=SIDECAR_DNS_PORT).start())
        self.fakefed = self._started(self._start_fakefed())
        self.timings["remotes"] = time.monotonic() - began
        proxy_url = ""
        ca_file = self.ca.ca_pem_path
        if self.mode != "direct":
            began = time.monotonic()
            # The sidecar's defaults (probes on: they learn the 410s), trusting the world's
            # CA for its own requests and dialling loopback.
            ca = str(self.ca.ca_pem_path)
            args = ["--allow-address", "127.0.0.0/8", "--upstream-ca", ca, *self.sidecar_args]
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

    def _blackhole(self) -> None:
        """Drop every SYN to the blackholed addresses (INPUT: the SYN counter saw it)."""
        path = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
        tool = shutil.which("iptables", path=path)
        if tool is None:
            raise RuntimeError("the scale world needs iptables (apt-get install iptables)")
        for ip in BLACKHOLE_IPS:
            rule = ["-A", "INPUT", "-d", ip, "-p", "tcp", "--syn", "-j", "DROP"]
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
            command_prefix=self.namespace.command([]),
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

    # -- observation -----------------------------------------------------------------------

    def control(self, path: str, method: str = "GET") -> Any:
        """The fake federation's control API (tests/scale/fakefed.py)."""
        url = f"http://127.0.0.1:{CONTROL_PORT}{path}"
        with httpx.Client(trust_env=False, timeout=CONTROL_TIMEOUT) as client:
            response = client.request(method, url)
            response.raise_for_status()
            return response.json()

    def dead_reached(self) -> dict[str, int]:
        """SYNs to each dead kind's address, and requests the gone-over-HTTP ones answered."""
        assert self.syns is not None
        reached: dict[str, int] = {}
        addresses = {ip for ip in DEAD_KINDS.values() if ip is not None}
        for ip in sorted(addresses):
            kinds = "+".join(k for k, a in DEAD_KINDS.items() if a == ip)
            reached[f"SYNs {kinds} ({ip})"] = self.syns.count(ip)
            reached[f"connection attempts {kinds} ({ip})"] = self.syns.attempts(ip)
        stats = self.control("/stats")
        for kind_port, count in sorted(stats["gone_kinds"].items()):
            reached[f"requests {kind_port}"] = count
        reached["SYNs dropped by the blackhole rules"] = self.dropped_syns()
        return reached

    def usage(self) -> dict[str, dict[str, float]]:
        """CPU and memory of Synapse, the sidecar and the fake federation."""
        found: dict[str, dict[str, float]] = {}
        if self.synapse is not None and self.synapse.process.alive:
            found["synapse"] = process_usage(self.synapse.process.pid)
        if self.sidecar is not None and self.sidecar.process.alive:
            found["sidecar"] = process_usage(self.sidecar.process.pid)
        stats = self.control("/stats")
        found["fakefed"] = {
            "cpu_seconds": stats["cpu_seconds"],
            "vmrss_kb": stats["rss_kb"],
            "vmhwm_kb": stats["max_rss_kb"],
        }
        return found

    def dns_queries(self) -> dict[str, int]:
        assert self.dns is not None and self.sidecar_dns is not None
        return {"synapse": len(self.dns.query_log), "sidecar": len(self.sidecar_dns.query_log)}

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
        if self.fakefed is not None:
            logs["fakefed log"] = self.fakefed.log_text()
            with contextlib.suppress(Exception):
                logs["fakefed stats"] = json.dumps(self.control("/stats"), indent=1)
        return logs
