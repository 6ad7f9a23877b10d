"""The join storm: `python -m tests.bench.storm` (or `python -m tests.bench --only storm`).

A homeserver joining a room of ~10,000 servers opens a tunnel to each of them within
seconds, almost all names it never asked the sidecar about. This scenario replays that
against a real sidecar process (pass-through, `--refusal close`) and a real DNS server on
loopback whose every answer is late by `--dns-delay-ms`, as a real resolver's would be:

- N first-contact names (default 10,000), a fifth of each kind: live (an A record
  pointing at the loopback TLS upstream), TXT `v=matrix;gone`, SRV ".", a `.invalid`
  name (decided without DNS) and NXDOMAIN;
- a storm client (its own process) opens a CONNECT to every name, `--concurrency` at a
  time (default: all of them, as far as RLIMIT_NOFILE allows), and reads each answer:
  200 for a live name, the connection closed for a gone one;
- meanwhile a probe process opens, one after the other, a CONNECT to a name already
  cached alive and one to a fresh live name, each followed by a TLS handshake with the
  upstream through the tunnel, before the storm (at rest) and during it.

Reported: DNS questions per name (every name must get exactly one query set), the peak
of DNS queries in flight at the server against the sidecar's bound, decisions per
second, the sidecar's CPU seconds and RSS before and after, per destination, the
verdicts cached at the end, and the probes' latencies during the storm against at rest.

Subcommands run as their own processes: `client` (the storm) and `probe` (the live
probe); each prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import resource
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.dns.client import MAX_CONCURRENT_QUERIES
from tests.support.sidecar_process import Sidecar
from tests.support.storm_world import (
    AFTER_SECONDS,
    ANSWER_TIMEOUT,
    CACHED,
    DEFAULT_DELAY_MS,
    DEFAULT_NAMES,
    FRESH_NAMES,
    PROBE_PAUSE,
    QUESTIONS_PER_DECISION,
    REPO,
    REST_SECONDS,
    StormWorld,
    concurrency_for,
    percentile,
    proc_stat,
    raise_nofile,
    run_storm,
    udp_receive_errors,
)

# -- the live probe ----------------------------------------------------------------------------


async def probe_once(
    port: int, name: str, upstream_port: int, context: ssl.SSLContext
) -> dict[str, Any]:
    """CONNECT to a live name, then a TLS handshake with the upstream through the tunnel."""
    started = time.monotonic()
    target = f"{name}:{upstream_port}"
    sample: dict[str, Any] = {"t": started, "name": name}
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), ANSWER_TIMEOUT
        )
    except (OSError, TimeoutError) as e:
        sample["error"] = f"connect: {type(e).__name__}"
        return sample
    try:
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ANSWER_TIMEOUT)
        sample["connect_ms"] = (time.monotonic() - started) * 1000
        if not head.startswith(b"HTTP/1.1 200"):
            sample["error"] = f"answer {head[:40]!r}"
            return sample
        await asyncio.wait_for(writer.start_tls(context, server_hostname=name), ANSWER_TIMEOUT)
        sample["tls_ms"] = (time.monotonic() - started) * 1000
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError) as e:
        sample["error"] = f"{type(e).__name__}: {e}"
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    return sample


async def run_probe(
    port: int, upstream_port: int, cafile: str, fresh: list[str], stop: threading.Event
) -> list[dict[str, Any]]:
    """Two probes side by side until `stop`, each one connection after the other: the
    cached live name, and fresh live names (each used once), so that a slow fresh one
    does not thin out the cached one's samples."""
    context = ssl.create_default_context(cafile=cafile)
    samples: list[dict[str, Any]] = []

    async def loop(kind: str, names: Iterator[str]) -> None:
        for name in names:
            if stop.is_set():
                return
            sample = await probe_once(port, name, upstream_port, context)
            sample["kind"] = kind
            samples.append(sample)
            await asyncio.sleep(PROBE_PAUSE)

    await asyncio.gather(loop("cached", itertools.repeat(CACHED)), loop("fresh", iter(fresh)))
    return samples


# -- subcommands run as processes ------------------------------------------------------------


def cmd_client(args: argparse.Namespace) -> int:
    targets = Path(args.targets).read_text().split()
    concurrency = concurrency_for(len(targets), args.concurrency)
    result = asyncio.run(run_storm(args.port, targets, concurrency))
    result["concurrency"] = concurrency
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = usage.ru_utime + usage.ru_stime
    json.dump(result, sys.stdout)
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    """Probes until stdin closes, then the samples as JSON."""
    raise_nofile()
    stop = threading.Event()

    def wait_for_eof() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    fresh = Path(args.fresh).read_text().split()
    samples = asyncio.run(run_probe(args.port, args.upstream_port, args.cafile, fresh, stop))
    json.dump(samples, sys.stdout)
    return 0


# -- the benchmark -----------------------------------------------------------------------------


@dataclass
class Cpus:
    """The sidecar on the first CPU, everything else (servers, clients) on the others."""

    sidecar: set[int] | None
    rest: set[int] | None

    @classmethod
    def plan(cls, pin: bool) -> Cpus:
        cpus = sorted(os.sched_getaffinity(0))
        if not pin or len(cpus) < 2:
            return cls(None, None)
        return cls({cpus[0]}, set(cpus[1:]))

    def describe(self) -> str:
        if self.sidecar is None:
            return "none: the sidecar, the DNS server and the clients share the CPUs"
        return (
            f"sidecar on CPU {sorted(self.sidecar)}; DNS server, upstream, storm client and "
            f"probe on CPU {sorted(self.rest or ())}"
        )


@contextlib.contextmanager
def on_cpus(cpus: set[int] | None) -> Iterator[None]:
    """Threads and processes started inside inherit `cpus` (this thread's affinity)."""
    if cpus is None:
        yield
        return
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    for key in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        env.pop(key, None)
    return env


def metric_sum(sidecar: Sidecar, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(
        value for (n, have), value in sidecar.metrics().items() if n == name and want <= have
    )


def own_cpu() -> float:
    """This process's CPU seconds: the DNS server's and the TLS upstream's threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sidecar_figures(sidecar: Sidecar) -> dict[str, float]:
    """Counters from the sidecar's /metrics that explain where a storm's time went."""
    return {
        "dns_seconds": metric_sum(sidecar, "tombstone_dns_query_seconds_sum"),
        "dns_queries": metric_sum(sidecar, "tombstone_dns_query_seconds_count"),
        "lag_seconds": metric_sum(sidecar, "tombstone_event_loop_lag_seconds_sum"),
        "lag_samples": metric_sum(sidecar, "tombstone_event_loop_lag_seconds_count"),
    }


def latency_summary(samples: list[dict[str, Any]], key: str) -> dict[str, float]:
    values = [s[key] for s in samples if key in s]
    return {
        "n": len(values),
        "p50": percentile(values, 0.5),
        "p99": percentile(values, 0.99),
        "max": max(values) if values else float("nan"),
    }


def start_py_spy(out: Path | None, pid: int) -> subprocess.Popen[bytes] | None:
    """py-spy recording the sidecar until `stop_py_spy` (raw stacks in `out`)."""
    if out is None:
        return None
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        raise RuntimeError("py-spy not found (pip install py-spy)")
    argv = [py_spy, "record", "--pid", str(pid), "--rate", "200", "--nonblocking"]
    argv += ["--format", "raw", "--output", str(out)]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # attached before the storm
    return spy


def stop_py_spy(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is not None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        spy.wait(timeout=60)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    nofile = raise_nofile()
    cpus = Cpus.plan(not args.no_pin)
    delay = args.dns_delay_ms / 1000

    def log(text: str) -> None:
        if not args.quiet:
            print(f"[storm] {text}", file=sys.stderr, flush=True)

    world = StormWorld(args.names, 0.0, fresh=FRESH_NAMES)
    with on_cpus(cpus.sidecar):  # the sidecar process inherits the first CPU ...
        world.start()
    try:
        if cpus.rest is not None:  # ... the DNS and upstream threads moved with us: move them
            os.sched_setaffinity(0, cpus.rest)
            for tid in os.listdir("/proc/self/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), cpus.rest)
        sidecar, dns = world.sidecar, world.dns
        pid = sidecar.process.pid
        assert sidecar.tunnel_opens(world.target(CACHED)), "the cached name did not open"
        dns.zone.delay(delay)
        log(f"sidecar pid {pid} ready; {args.names} names, DNS delay {args.dns_delay_ms:g} ms")
        targets = [world.target(n) for n in world.names]
        scratch = world.scratch
        (scratch / "targets").write_text("\n".join(targets))
        (scratch / "fresh").write_text("\n".join(world.fresh_names))
        before = proc_stat(pid)
        rest_verdicts = len(world.verdicts())
        with on_cpus(cpus.rest):
            probe = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.bench.storm",
                    "probe",
                    "--port",
                    str(sidecar.proxy_port),
                    "--upstream-port",
                    str(world.upstream.port),
                    "--cafile",
                    str(world.ca.ca_pem_path),
                    "--fresh",
                    str(scratch / "fresh"),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                cwd=REPO,
                env=child_env(),
                text=True,
            )
        try:
            time.sleep(REST_SECONDS)
            dns.reset_queries()
            udp_errors = udp_receive_errors()
            inside_before = sidecar_figures(sidecar)
            own_before = own_cpu()
            spy = start_py_spy(args.py_spy, pid)
            log("storm starting")
            with on_cpus(cpus.rest):
                done = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "tests.bench.storm",
                        "client",
                        "--port",
                        str(sidecar.proxy_port),
                        "--targets",
                        str(scratch / "targets"),
                        *(["--concurrency", str(args.concurrency)] if args.concurrency else []),
                    ],
                    capture_output=True,
                    text=True,
                    cwd=REPO,
                    env=child_env(),
                    timeout=900,
                    check=False,
                )
            if done.returncode != 0:
                raise RuntimeError(f"storm client exited {done.returncode}: {done.stderr[-2000:]}")
            storm = json.loads(done.stdout)
            stop_py_spy(spy)
            peak = dns.peak_in_flight
            servers_cpu = own_cpu() - own_before
            inside = {k: v - inside_before[k] for k, v in sidecar_figures(sidecar).items()}
            udp_drops = udp_receive_errors() - udp_errors
            log(f"storm done in {storm['ended'] - storm['started']:.1f} s; probes for 1 s more")
            time.sleep(AFTER_SECONDS)
        finally:
            out, _ = probe.communicate("", timeout=120)
        samples: list[dict[str, Any]] = json.loads(out)
        after = proc_stat(pid)
        sets = world.query_sets()
        wrong = world.wrong_verdicts()
        held = world.verdicts()
        refused = metric_sum(sidecar, "tombstone_admission_refused_total")
        crash = [ln for ln in sidecar.log().splitlines() if "Traceback" in ln or " ERROR " in ln]
    finally:
        world.close()

    statuses = storm["statuses"]
    kinds = list(world.names.values())
    answered_right = sum(
        1
        for kind, status in zip(kinds, statuses, strict=True)
        if status == (200 if kind == "live" else 0)
    )
    wall = storm["ended"] - storm["started"]
    rest = [s for s in samples if s["t"] < storm["started"]]
    during = [s for s in samples if storm["started"] <= s["t"] <= storm["ended"]]
    probes: dict[str, Any] = {}
    for phase, group in (("rest", rest), ("storm", during)):
        for kind in ("cached", "fresh"):
            chosen = [s for s in group if s["kind"] == kind]
            probes[f"{phase}_{kind}"] = {
                "connect": latency_summary(chosen, "connect_ms"),
                "tls": latency_summary(chosen, "tls_ms"),
                "errors": [s["error"] for s in chosen if "error" in s][:3],
                "error_count": sum(1 for s in chosen if "error" in s),
            }
    lat = storm["latencies_ms"]
    return {
        "names": args.names,
        "by_kind": dict(Counter(kinds)),
        "dns_delay_ms": args.dns_delay_ms,
        "nofile": nofile,
        "concurrency": storm["concurrency"],
        "pinning": cpus.describe(),
        "questions_per_decision": QUESTIONS_PER_DECISION,
        "query_sets": sets,
        "peak_in_flight": peak,
        "bound": MAX_CONCURRENT_QUERIES,
        "udp_drops": udp_drops,
        "wall_s": wall,
        "decisions_per_s": args.names / wall,
        "answered_right": answered_right,
        "client_errors": storm["errors"],
        "client_first_errors": storm["first_errors"],
        "client_cpu_s": storm["cpu_s"],
        "storm_latency_ms": {
            "p50": percentile(lat, 0.5),
            "p99": percentile(lat, 0.99),
            "max": max(lat),
        },
        "wrong_verdicts": len(wrong),
        "wrong_examples": wrong[:3],
        "wrong_held": dict(Counter(w.split(": ", 1)[1].split(" (expected")[0] for w in wrong)),
        "verdicts_at_rest": rest_verdicts,
        "verdicts_at_end": len(held),
        "sidecar_before": before,
        "sidecar_after": after,
        "admission_refused": refused,
        "servers_cpu_s": servers_cpu,
        "sidecar_dns_query_ms": inside["dns_seconds"] / max(inside["dns_queries"], 1) * 1000,
        "sidecar_dns_queries": inside["dns_queries"],
        "sidecar_loop_lag_ms": inside["lag_seconds"] / max(inside["lag_samples"], 1) * 1000,
        "sidecar_error_lines": crash[:3],
        "probes": probes,
    }


def markdown(r: dict[str, Any], command: str) -> str:
    """The Join storm table for docs/performance.md."""
    from tests.bench.report import machine_info

    machine = machine_info(r["pinning"])
    b, a = r["sidecar_before"], r["sidecar_after"]
    n = r["names"]
    cpu = a["cpu_s"] - b["cpu_s"]
    rss = a["vmrss_mib"] - b["vmrss_mib"]
    sets = r["query_sets"]
    p = r["probes"]
    cold = p["rest_fresh"]["connect"]["p50"]
    mix = ", ".join(f"{v:,} {k}" for k, v in r["by_kind"].items())
    lines = [f"- **{k}**: {v}" for k, v in machine.items()]
    lines += [
        f"- **command**: `{command}`",
        f"- **storm**: {n:,} first-contact names ({mix}), "
        f"every DNS answer {r['dns_delay_ms']:g} ms late, {r['concurrency']:,} CONNECTs open at "
        f"once (RLIMIT_NOFILE raised to {r['nofile']:,})",
        "",
        "| metric | value | goal | met |",
        "|---|---:|---|---|",
    ]

    def row(metric: str, value: str, goal: str = "", met: bool | None = None) -> None:
        mark = {True: "yes", False: "**NO**", None: ""}[met]
        lines.append(f"| {metric} | {value} | {goal} | {mark} |")

    row(
        "names with exactly one query set",
        f"{sets['exact']:,}/{sets['names']:,} ({sets['queries']:,} queries; "
        f"{sets['repeated']} names asked twice, {sets['unasked']} never asked)",
        f"all: {r['questions_per_decision']} (TXT, 2 SRV, A, AAAA); none for .invalid",
        sets["exact"] == sets["names"],
    )
    row(
        "peak DNS queries in flight (at the server)",
        f"{r['peak_in_flight']:,}",
        f"<= {r['bound']} (MAX_CONCURRENT_QUERIES)",
        r["peak_in_flight"] <= r["bound"],
    )
    row(
        "every name decided correctly (client answer and /v1/verdicts)",
        f"{r['answered_right']:,}/{n:,} answers, {n - r['wrong_verdicts']:,}/{n:,} verdicts",
        "all",
        r["answered_right"] == n and r["wrong_verdicts"] == 0,
    )
    row(
        "decisions per second (first CONNECT to last answer)",
        f"{r['decisions_per_s']:,.0f}/s ({r['wall_s']:.1f} s)",
    )
    sl = r["storm_latency_ms"]
    row(
        "storm CONNECT latency p50 / p99 / max",
        f"{sl['p50']:,.0f} / {sl['p99']:,.0f} / {sl['max']:,.0f} ms",
    )
    row(
        "sidecar CPU seconds during the storm",
        f"{cpu:.1f} s ({cpu / n * 1e6:,.0f} µs per destination)",
    )
    row(
        "sidecar RSS before → after",
        f"{b['vmrss_mib']:.0f} → {a['vmrss_mib']:.0f} MiB (peak {a['vmhwm_mib']:.0f}; "
        f"{rss * 2**20 / n:,.0f} B per destination)",
    )
    row("verdicts cached before → after", f"{r['verdicts_at_rest']:,} → {r['verdicts_at_end']:,}")
    for kind, label in (("cached", "cached live name"), ("fresh", "fresh live name")):
        rest, storm = p[f"rest_{kind}"], p[f"storm_{kind}"]
        for key, what in (("connect", "CONNECT → 200"), ("tls", "→ TLS up")):
            rs, ss = rest[key], storm[key]
            wait = ss["max"] - rs["p50"]
            row(
                f"probe, {label}, {what}: at rest p50 / p99 / max (n) vs during the storm",
                f"{rs['p50']:.1f} / {rs['p99']:.1f} / {rs['max']:.1f} ms ({rs['n']}) vs "
                f"{ss['p50']:.1f} / {ss['p99']:.1f} / {ss['max']:.1f} ms ({ss['n']})",
                f"max wait ≤ one cold decision ({cold:.1f} ms)" if key == "connect" else "",
                (wait <= cold) if key == "connect" else None,
            )
    lines += [""]
    notes = [
        "one cold decision = the fresh live name's CONNECT → 200 p50 at rest; a probe's wait "
        "behind the burst = its latency during the storm - the at-rest p50 of its kind",
        f"storm client CPU {r['client_cpu_s']:.1f} s; {r['client_errors']} client errors"
        + (f" (e.g. {r['client_first_errors']})" if r["client_errors"] else ""),
        f"UDP receive-buffer drops during the storm: {r['udp_drops']}; admission refusals: "
        f"{r['admission_refused']:.0f}",
    ]
    if sets["misses"]:
        notes.append(f"names without exactly one query set, e.g. {sets['misses']}")
    if r["wrong_examples"]:
        notes.append(
            f"wrong verdicts, e.g. {r['wrong_examples']}; what was held instead: {r['wrong_held']}"
        )
    for kind in ("rest_cached", "rest_fresh", "storm_cached", "storm_fresh"):
        if p[kind]["error_count"]:
            notes.append(
                f"probe errors ({kind}): {p[kind]['error_count']}, e.g. {p[kind]['errors']}"
            )
    if r["sidecar_error_lines"]:
        notes.append(f"sidecar log errors: {r['sidecar_error_lines']}")
    lines += [f"- {x}" for x in notes]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.storm", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument(
        "--names", type=int, default=DEFAULT_NAMES, help="first-contact names (default 10000)"
    )
    parser.add_argument(
        "--dns-delay-ms",
        type=float,
        default=DEFAULT_DELAY_MS,
        help="added to every DNS answer (default 30)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        help="CONNECTs open at once (default: all, as RLIMIT_NOFILE allows)",
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin the sidecar to its own CPU"
    )
    parser.add_argument("--py-spy", type=Path, help="profile the sidecar during the storm")
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    parser.add_argument("--output", type=Path, help="also write the Markdown table here")
    parser.add_argument("-q", "--quiet", action="store_true")
    sub = parser.add_subparsers(dest="cmd")
    client = sub.add_parser("client", help="(internal) the storm client")
    client.add_argument("--port", type=int, required=True)
    client.add_argument("--targets", required=True)
    client.add_argument("--concurrency", type=int)
    probe = sub.add_parser("probe", help="(internal) the live probe")
    probe.add_argument("--port", type=int, required=True)
    probe.add_argument("--upstream-port", type=int, required=True)
    probe.add_argument("--cafile", required=True)
    probe.add_argument("--fresh", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(raw)
    if args.cmd == "client":
        return cmd_client(args)
    if args.cmd == "probe":
        return cmd_probe(args)
    result = run_bench(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    text = markdown(result, shlex.join(["python", "-m", "tests.bench.storm", *raw]))
    print(text)
    if args.output is not None:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
