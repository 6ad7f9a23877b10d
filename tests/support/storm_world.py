"""The join storm's world, shared by the benchmark (tests/bench/storm.py) and the CI-sized
test (tests/integration/test_join_storm.py): N first-contact names of five kinds in a real
DNS server on loopback whose answers are late, a TLS upstream for the live ones, a real
sidecar process, and the storm client that opens a CONNECT to each name."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.judge.signals import SRV_PREFIXES
from tests.support.dns_server import DnsServer
from tests.support.sidecar_process import Sidecar
from tests.support.tls_upstream import TestCA, Upstream

REPO = Path(__file__).resolve().parents[2]
DOMAIN = "storm.example"  # every name is one label under it: the upstream's *.storm.example
UPSTREAM_HOST = "127.0.0.2"  # where live names point (the TLS upstream's own address)
GONE_HOST = "127.0.0.3"  # the A record of tombstoned names that still have one
CACHED = f"cached.{DOMAIN}"  # the probe's name already known alive
KINDS = ("live", "txt", "srv", "invalid", "nxdomain")
# What the sidecar must decide for each kind: (state, signal).
EXPECTED = {
    "live": ("alive", None),
    "txt": ("gone", "dns_txt_gone"),
    "srv": ("gone", "dns_srv_dot"),
    "invalid": ("gone", "invalid_tld"),
    "nxdomain": ("gone", "nxdomain"),
}
DEFAULT_NAMES = 10_000
DEFAULT_DELAY_MS = 30.0  # a real resolver's answer for a name it has not cached: 20-50 ms
FD_RESERVE = 200  # descriptors a process keeps for itself beyond the storm's sockets
REST_SECONDS = 3.0  # probes at rest before the storm
AFTER_SECONDS = 1.0  # probes after the storm's last answer
PROBE_PAUSE = 0.01  # between two probes: light, but many samples during a storm
FRESH_NAMES = 5_000  # fresh live names the probe may use (one each)
ANSWER_TIMEOUT = 60.0  # a CONNECT unanswered this long counts as an error
# The DNS server's UDP receive buffer: the sidecar keeps up to MAX_CONCURRENT_QUERIES (256)
# in flight, exactly what the kernel's default buffer holds in small queries. On a loaded
# machine a query lost there is sent again only after the 2 s per-try timeout, late.
DNS_UDP_BUFFER = 4 * 1024 * 1024


def storm_name(kind: str, index: int, tag: str = "s") -> str:
    suffix = "invalid" if kind == "invalid" else DOMAIN
    return f"{tag}{index}-{kind}.{suffix}"


def questions_for(name: str) -> Counter[tuple[str, str]]:
    """The query set of one cold decision (sidecar/dns/questions.py): TXT, the two SRV,
    A and AAAA; none for a `.invalid` name."""
    if name.endswith(".invalid"):
        return Counter()
    return Counter(
        {
            ("TXT", name): 1,
            ("SRV", f"{SRV_PREFIXES[0]}.{name}"): 1,
            ("SRV", f"{SRV_PREFIXES[1]}.{name}"): 1,
            ("A", name): 1,
            ("AAAA", name): 1,
        }
    )


QUESTIONS_PER_DECISION = sum(questions_for(f"x.{DOMAIN}").values())


def fill_zone(dns: DnsServer, names: dict[str, str]) -> None:
    """Records for each name by kind. A name without SRV gets NXDOMAIN for its SRV names,
    as in real zones (their `_tcp` parent does not exist either)."""
    zone = dns.zone
    for name, kind in names.items():
        if kind == "invalid":
            continue
        if kind == "nxdomain":
            zone.nxdomain(name)
            continue
        zone.add(name, "A", UPSTREAM_HOST if kind == "live" else GONE_HOST)
        if kind == "txt":
            zone.add(name, "TXT", "v=matrix;gone")
        if kind == "srv":
            zone.add(f"{SRV_PREFIXES[0]}.{name}", "SRV", "0 0 0 .")
            zone.nxdomain(f"{SRV_PREFIXES[1]}.{name}")
        else:
            for prefix in SRV_PREFIXES:
                zone.nxdomain(f"{prefix}.{name}")


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def proc_stat(pid: int) -> dict[str, float]:
    """CPU seconds (user + system), VmRSS and VmHWM (peak RSS) of a process, in MiB."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    out = {"cpu_s": (int(fields[11]) + int(fields[12])) / ticks}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key.lower() + "_mib"] = int(value.split()[0]) / 1024
    return out


def udp_receive_errors() -> int:
    """The kernel's UDP RcvbufErrors: datagrams dropped on a full socket buffer."""
    with open("/proc/net/snmp") as snmp:
        rows = [line.split() for line in snmp if line.startswith("Udp:")]
    return int(dict(zip(rows[0], rows[1], strict=True))["RcvbufErrors"])


# -- the world: DNS server, TLS upstream, sidecar ---------------------------------------------


@dataclass
class StormWorld:
    """The DNS server with every name, the TLS upstream, one sidecar process; `close()`
    stops them all. Used by the benchmark and by tests/integration/test_join_storm.py."""

    count: int
    delay: float
    fresh: int = 0
    sidecar_args: Sequence[str] = ()
    names: dict[str, str] = field(default_factory=dict)  # storm name -> kind
    fresh_names: list[str] = field(default_factory=list)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def start(self) -> StormWorld:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        self.scratch = Path(self.stack.enter_context(tempfile.TemporaryDirectory(prefix="storm-")))
        self.ca = self.stack.enter_context(TestCA(self.scratch / "ca"))
        self.dns = self.stack.enter_context(
            DnsServer(timed_delay=True, udp_buffer_bytes=DNS_UDP_BUFFER)
        )
        self.names = {storm_name(KINDS[i % 5], i): KINDS[i % 5] for i in range(self.count)}
        self.fresh_names = [storm_name("live", i, "fresh") for i in range(self.fresh)]
        fill_zone(self.dns, self.names)
        fill_zone(self.dns, {n: "live" for n in [CACHED, *self.fresh_names]})
        self.upstream = self.stack.enter_context(
            Upstream(self.ca, [f"*.{DOMAIN}"], host=UPSTREAM_HOST)
        )
        self.sidecar = Sidecar(
            self.dns.port,
            [
                "--allow-address",
                "127.0.0.0/8",
                "--no-probe",  # the storm is about DNS decisions; probes go to port 8448
                "--store",
                "memory",
                "--dns-timeout",
                "5s",
                "--log-level",
                "info",
                *self.sidecar_args,
            ],
            log_dir=self.scratch,
        )
        self.stack.callback(self.sidecar.stop)
        self.sidecar.start()
        self.dns.zone.delay(self.delay)

    def close(self) -> None:
        self.stack.close()

    def __enter__(self) -> StormWorld:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def target(self, name: str) -> str:
        return f"{name}:{self.upstream.port}"

    # -- what happened ------------------------------------------------------------------

    def query_sets(self) -> dict[str, Any]:
        """Per storm name, the questions the DNS server received for it against one
        decision's set: how many names got exactly that, and examples of the others."""
        seen: dict[str, Counter[tuple[str, str]]] = {n: Counter() for n in self.names}
        queries = 0
        for q in self.dns.query_log:
            base = q.name
            for prefix in SRV_PREFIXES:
                if base.startswith(prefix + "."):
                    base = base[len(prefix) + 1 :]
            if base in seen:
                seen[base][(q.rrtype, q.name)] += 1
                queries += 1
        exact = unasked = repeated = 0
        misses: list[str] = []
        for name, got in seen.items():
            wanted = questions_for(name)
            if got == wanted:
                exact += 1
                continue
            if not got:
                unasked += 1  # never decided (the client gave up, or admission shed it)
            elif any(n > wanted[q] for q, n in got.items()):
                repeated += 1  # a question asked twice: the query set was not shared
            if got and len(misses) < 3:
                misses.append(f"{name}: {dict(got)}")
        return {
            "exact": exact,
            "names": len(seen),
            "unasked": unasked,
            "repeated": repeated,
            "queries": queries,
            "misses": misses,
        }

    def verdicts(self) -> dict[str, tuple[str, str | None]]:
        """Every verdict the sidecar holds: name -> (state, signal), from /v1/verdicts."""
        out: dict[str, tuple[str, str | None]] = {}
        offset = 0
        while True:
            status, body = self.sidecar.ops(f"/v1/verdicts?limit=1000&offset={offset}")
            if status != 200:
                raise RuntimeError(f"/v1/verdicts answered {status}: {body[:200]!r}")
            page = json.loads(body)
            for v in page["verdicts"]:
                out[v["destination"]] = (v["state"], v["signal"])
            offset += len(page["verdicts"])
            if not page["verdicts"] or offset >= page["total"]:
                return out

    def wrong_verdicts(self) -> list[str]:
        """Storm names whose verdict is missing or not what their kind calls for."""
        held = self.verdicts()
        return [
            f"{name}: {held.get(name)} (expected {EXPECTED[kind]})"
            for name, kind in self.names.items()
            if held.get(name) != EXPECTED[kind]
        ]


# -- the storm client ------------------------------------------------------------------------


async def connect_once(port: int, target: str) -> tuple[int, str]:
    """One CONNECT: (200 or another status, ""), (0, "") when closed without an answer (a
    refusal under --refusal close), or (-1, the error)."""
    payload = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), ANSWER_TIMEOUT
        )
    except (OSError, TimeoutError) as e:
        return -1, f"connect: {type(e).__name__}: {e}"
    try:
        writer.write(payload)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ANSWER_TIMEOUT)
        return int(head.split(b" ", 2)[1]), ""
    except asyncio.IncompleteReadError as e:
        return (0, "") if not e.partial else (-1, f"partial answer {e.partial[:60]!r}")
    except ConnectionResetError:
        return 0, ""  # a refusal while our CONNECT was still unread: closed with RST
    except (OSError, TimeoutError, ValueError, IndexError) as e:
        return -1, f"{type(e).__name__}: {e}"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def run_storm(port: int, targets: Sequence[str], concurrency: int) -> dict[str, Any]:
    """Every target once, `concurrency` at a time: statuses, latencies, the wall clock."""
    gate = asyncio.Semaphore(concurrency)
    statuses: list[int] = [0] * len(targets)
    latencies: list[float] = [0.0] * len(targets)
    errors: list[str] = []

    async def one(index: int, target: str) -> None:
        async with gate:
            started = time.perf_counter()
            status, error = await connect_once(port, target)
            latencies[index] = (time.perf_counter() - started) * 1000
            statuses[index] = status
            if error:
                errors.append(f"{target}: {error}")

    begun = time.monotonic()
    await asyncio.gather(*(one(i, t) for i, t in enumerate(targets)))
    ended = time.monotonic()
    return {
        "statuses": statuses,
        "latencies_ms": latencies,
        "errors": len(errors),
        "first_errors": errors[:3],
        "started": begun,
        "ended": ended,
    }


def concurrency_for(count: int, requested: int | None) -> int:
    """All at once if the open-file limit allows (one socket each), else what it allows."""
    room = raise_nofile() - FD_RESERVE
    wanted = requested if requested else count
    return max(1, min(wanted, room, count))
