"""In-process measurements, each in a fresh process: `python -m tests.bench.inproc MODE ...`.

JSON on stdout. A fresh process per measurement keeps the numbers clean: no DNS server
or TLS upstream threads in this interpreter (the harness hosts those), and for the memory
figure nothing but the verdict cache grows between the two RSS readings.

Modes:
- `decision`: `Policy.cached()` for a gone and an alive name (both decided once against
  the real DNS server first), timed per call with `perf_counter_ns`; then the addon's full
  `http_connect` for a cached gone and a cached alive name inside mitmproxy's
  `taddons.context`, next to the baseline addon's `http_connect` (tests/bench/connect_502).
- `cold`: `Policy.decide()` for names never seen, one at a time and all at once, each
  decision timed against the slowest of its own DNS queries (timed at the DnsClient).
- `memory`: RSS growth per cached verdict (`VerdictCache.put` of realistic verdicts).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import inspect
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from sidecar.app import standalone_policy
from sidecar.dns.client import DnsClient, Nameserver
from sidecar.judge.dns_answer import DnsAnswer
from sidecar.judge.signals import SRV_PREFIXES
from sidecar.judge.ttl import TtlBounds
from sidecar.judge.verdicts import State, Verdict
from sidecar.metrics import Metrics

TTL = TtlBounds(300.0, 86400.0)  # the sidecar's defaults: --min-ttl 5m, --max-ttl 24h


def _nameserver(text: str) -> Nameserver:
    host, _, port = text.rpartition(":")
    return Nameserver(host, int(port))


def _stats_us(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    n = len(ordered)

    def pick(q: float) -> float:
        return ordered[min(n - 1, round(q * (n - 1)))] / 1000.0

    return {
        "n": n,
        "p50_us": pick(0.50),
        "p90_us": pick(0.90),
        "p99_us": pick(0.99),
        "max_us": ordered[-1] / 1000.0,
        "mean_us": sum(ordered) / n / 1000.0,
    }


def _timer_overhead_ns() -> int:
    """perf_counter_ns() back to back: what every per-call sample includes on top."""
    clock = time.perf_counter_ns
    samples = []
    for _ in range(10_000):
        t0 = clock()
        samples.append(clock() - t0)
    samples.sort()
    return samples[len(samples) // 2]


def _time_sync(call: Callable[[], object], calls: int) -> list[int]:
    clock = time.perf_counter_ns
    samples = [0] * calls
    for i in range(calls):
        t0 = clock()
        call()
        samples[i] = clock() - t0
    return samples


# -- decision ----------------------------------------------------------------------------


async def _policy_decision(args: argparse.Namespace) -> dict[str, Any]:
    metrics = Metrics()
    dns = DnsClient((_nameserver(args.nameserver),), 5.0, metrics)
    policy = standalone_policy(dns, metrics, ttl=TTL, cache_size=100_000)
    out: dict[str, Any] = {}
    for label, name, want in (("gone", args.gone, State.GONE), ("alive", args.alive, State.ALIVE)):
        entry = await policy.decide(name)
        if entry.verdict.state is not want:
            raise SystemExit(f"{name}: expected {want}, DNS gave {entry.verdict.describe()}")
        assert policy.cached(name) is entry
        call = functools.partial(policy.cached, name)
        _time_sync(call, 1000)  # warm up
        out[f"cached_{label}"] = _stats_us(_time_sync(call, args.calls))
    return out


def _connect_flow(host: str, port: int) -> Any:
    from mitmproxy import http
    from mitmproxy.test import tflow

    flow = tflow.tflow()
    now = time.time()
    flow.request = http.Request(
        host=host,
        port=port,
        method=b"CONNECT",
        scheme=b"",
        authority=f"{host}:{port}".encode(),
        path=b"",
        http_version=b"HTTP/1.1",
        headers=http.Headers(),
        content=b"",
        trailers=None,
        timestamp_start=now,
        timestamp_end=now,
    )
    return flow


KILLED = "killed"  # `expect` for a hook that refuses by killing the flow (close)


def _outcome(flow: Any) -> int | str | None:
    if flow.response is not None:
        return int(flow.response.status_code)
    return KILLED if flow.error is not None else None


async def _time_hook(
    hook: Callable[[Any], Any], flow: Any, calls: int, expect: int | str | None
) -> list[int]:
    """Time `hook(flow)` per call (awaiting it if it is a coroutine), checking the outcome:
    a status code, `KILLED` (connection closed without an answer), or None (forwarded)."""
    clock = time.perf_counter_ns
    samples = [0] * calls
    for i in range(calls):
        flow.response = None
        flow.error = None
        flow.live = True
        t0 = clock()
        result = hook(flow)
        if result is not None:
            await result
        samples[i] = clock() - t0
    outcome = _outcome(flow)
    if outcome != expect:
        raise SystemExit(f"{flow.request.host}: expected {expect}, got {outcome}")
    return samples


async def _maybe_await(value: object) -> None:
    if inspect.isawaitable(value):
        await value


async def _addon_decision(args: argparse.Namespace) -> dict[str, Any]:
    """The real addon inside mitmproxy's test context: the full `http_connect` hook.

    Options are set the way mitmproxy sets them (`configure`), and the addon's `running`
    and `done` hooks are called around the timing, as mitmproxy would.
    """
    from mitmproxy.test import taddons

    from sidecar.config.options import BY_NAME
    from sidecar.proxy.addon import TombstoneAddon
    from tests.bench.connect_502 import Answer502

    addon = TombstoneAddon()
    out: dict[str, Any] = {}
    options: dict[str, Any] = {
        "tombstone_nameserver": [args.nameserver],
        "tombstone_ops_listen": "",
        "tombstone_allow_address": ["127.0.0.0/8"],
    }
    if "store" in BY_NAME:  # the hot path only: no state file behind the cache
        options["tombstone_store"] = "memory"
    with taddons.context(addon) as tctx:
        # The answer the 502 baseline gives: a status with a JSON body (`--refusal status`).
        refusal = "refusal" in BY_NAME
        if refusal:
            options["tombstone_refusal"] = "status"
        tctx.configure(addon, **options)
        await _maybe_await(getattr(addon, "running", lambda: None)())
        try:
            cases: list[tuple[str, str, int | str | None]] = [
                ("gone", args.gone, 502),
                ("alive", args.alive, None),
            ]
            for label, name, expect in cases:
                flow = _connect_flow(name, 8448)
                await _time_hook(addon.http_connect, flow, 200, expect)  # decides, warms
                out[f"addon_connect_{label}"] = _stats_us(
                    await _time_hook(addon.http_connect, flow, args.hook_calls, expect)
                )
            if refusal:  # the default refusal: close the connection, no answer built
                tctx.configure(addon, tombstone_refusal="close")
                flow = _connect_flow(args.gone, 8448)
                await _time_hook(addon.http_connect, flow, 200, KILLED)
                out["addon_connect_gone_close"] = _stats_us(
                    await _time_hook(addon.http_connect, flow, args.hook_calls, KILLED)
                )
            baseline = Answer502()
            flow = _connect_flow(args.gone, 8448)
            await _time_hook(baseline.http_connect, flow, 200, 502)
            out["baseline_connect_502"] = _stats_us(
                await _time_hook(baseline.http_connect, flow, args.hook_calls, 502)
            )
        finally:
            await _maybe_await(getattr(addon, "done", lambda: None)())
    return out


async def mode_decision(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"timer_overhead_ns": _timer_overhead_ns()}
    out.update(await _policy_decision(args))
    try:
        out.update(await _addon_decision(args))
    except Exception as e:  # the helpers differ between mitmproxy versions: say so, go on
        out["addon_error"] = f"{type(e).__name__}: {e}"
    return out


# -- cold --------------------------------------------------------------------------------


def _base_name(qname: str) -> str:
    for prefix in SRV_PREFIXES:
        if qname.startswith(prefix + "."):
            return qname[len(prefix) + 1 :]
    return qname


async def mode_cold(args: argparse.Namespace) -> dict[str, Any]:
    """Cold decisions timed against the slowest of their own queries."""
    metrics = Metrics()
    dns = DnsClient((_nameserver(args.nameserver),), 5.0, metrics)
    policy = standalone_policy(dns, metrics, ttl=TTL, cache_size=100_000)
    slowest: dict[str, int] = {}
    queries: dict[str, int] = {}
    plain_query = dns.query

    async def timed_query(name: str, rrtype: str, recent: bool = False) -> DnsAnswer:
        t0 = time.perf_counter_ns()
        answer = await plain_query(name, rrtype, recent)
        took = time.perf_counter_ns() - t0
        base = _base_name(name)
        slowest[base] = max(slowest.get(base, 0), took)
        queries[base] = queries.get(base, 0) + 1
        return answer

    dns.query = timed_query  # type: ignore[method-assign]

    async def decide(name: str) -> dict[str, Any]:
        t0 = time.perf_counter_ns()
        entry = await policy.decide(name)
        took = time.perf_counter_ns() - t0
        return {"name": name, "decision_ns": took, "state": entry.verdict.state.value}

    out: dict[str, Any] = {}
    sequential = [n for n in args.sequential.split(",") if n]
    burst = [n for n in args.burst.split(",") if n]
    if sequential:
        out["sequential"] = [await decide(n) for n in sequential]
    if burst:
        t0, cpu0 = time.perf_counter_ns(), time.process_time_ns()
        out["burst"] = list(await asyncio.gather(*(decide(n) for n in burst)))
        out["burst_wall_ns"] = time.perf_counter_ns() - t0
        out["burst_cpu_ns"] = time.process_time_ns() - cpu0  # this process: the sidecar side
    for rows in (out.get("sequential", []), out.get("burst", [])):
        for row in rows:
            row["slowest_query_ns"] = slowest.get(row["name"], 0)
            row["queries_sent"] = queries.get(row["name"], 0)
    return out


# -- memory ------------------------------------------------------------------------------


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _realistic_verdict(i: int, now: float) -> Verdict:
    """What the cache holds in production: mostly alive names with addresses, some gone."""
    name = f"matrix-{i:07d}.example-homeserver.org"
    kind = i % 10
    if kind == 0:
        return Verdict(
            name, State.GONE, "dns_txt_gone", f"TXT {name} 'v=matrix;gone'", now, now + 3600.0
        )
    if kind == 1:
        return Verdict(
            name, State.GONE, "nxdomain", f"{name} does not exist (NXDOMAIN)", now, now + 600.0
        )
    return Verdict(name, State.ALIVE, None, "no tombstone in DNS", now, now + 3600.0 + (i % 300))


def mode_memory(args: argparse.Namespace) -> dict[str, Any]:
    metrics = Metrics()
    dns = DnsClient((Nameserver("127.0.0.1", 53),), 5.0, metrics)
    policy = standalone_policy(dns, metrics, ttl=TTL, cache_size=args.count)
    cache = policy.cache
    now = time.time()
    _realistic_verdict(0, now)  # first call: any lazy allocations happen before the baseline
    gc.collect()
    before = _rss_kib()
    t0 = time.perf_counter()
    for i in range(args.count):
        cache.put(_realistic_verdict(i, now))
    fill_seconds = time.perf_counter() - t0
    gc.collect()
    after = _rss_kib()
    t0 = time.perf_counter()
    gc.collect()  # what a full collection costs the event loop with this cache
    gc_seconds = time.perf_counter() - t0
    if len(cache) != args.count:
        raise SystemExit(f"cache holds {len(cache)} verdicts, expected {args.count}")
    return {
        "count": args.count,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "bytes_per_verdict": (after - before) * 1024 / args.count,
        "put_us": fill_seconds / args.count * 1e6,
        "gc_full_ms": gc_seconds * 1000,
        "gc_tracked_objects": len(gc.get_objects()),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.inproc", description=__doc__)
    modes = parser.add_subparsers(dest="mode", required=True)
    decision = modes.add_parser("decision")
    decision.add_argument("--nameserver", required=True, help="IP:PORT of the DNS server")
    decision.add_argument("--gone", required=True, help="a name DNS marks gone")
    decision.add_argument("--alive", required=True, help="a live name (allowed address)")
    decision.add_argument("--calls", type=int, default=200_000)
    decision.add_argument("--hook-calls", type=int, default=20_000)
    cold = modes.add_parser("cold")
    cold.add_argument("--nameserver", required=True)
    cold.add_argument("--sequential", default="", help="names decided one after another")
    cold.add_argument("--burst", default="", help="names decided all at once")
    memory = modes.add_parser("memory")
    memory.add_argument("--count", type=int, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mode == "memory":
        result = mode_memory(args)
    elif args.mode == "decision":
        result = asyncio.run(mode_decision(args))
    else:
        result = asyncio.run(mode_cold(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
