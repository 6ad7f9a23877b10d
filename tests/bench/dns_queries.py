"""DNS queries per hour for one busy live name: `python -m tests.bench.dns_queries`.

The name has an A TTL of 60 s and TXT/SRV TTLs (and negative TTLs) of 3600 s, the sidecar
its default `--min-ttl 5m`; a client opens a tunnel to it every 250 ms (scaled). Every TTL
and `--min-ttl` are divided by `--scale` (default 60: an hour in a minute), so the query
counts at the test DNS server, multiplied back, are the hourly figures. Run it against
another checkout by putting that checkout first on PYTHONPATH: the sidecar process
imports whatever `sidecar` package it finds first.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tests.support.dns_server import DnsServer
from tests.support.sidecar_process import Sidecar
from tests.support.tls_upstream import TestCA, Upstream

NAME = "busy.example.test"
A_TTL, TXT_TTL, MIN_TTL = 60, 3600, 300  # the figures and the sidecar's default


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.dns_queries")
    parser.add_argument("--scale", type=int, default=60, help="time compression (default 60)")
    parser.add_argument("--seconds", type=float, default=60.0, help="wall time (default 60)")
    args = parser.parse_args()
    scale = args.scale
    with (
        tempfile.TemporaryDirectory(prefix="tombstone-dnsq-") as scratch,
        TestCA(Path(scratch) / "ca") as ca,
        DnsServer() as dns,
    ):
        zone = dns.zone
        zone.add(NAME, "A", "127.0.0.2", ttl=A_TTL // scale)
        zone.add(NAME, "TXT", "v=spf1 -all", ttl=TXT_TTL // scale)
        for prefix in ("_matrix-fed._tcp", "_matrix._tcp"):
            zone.nodata(f"{prefix}.{NAME}", soa_minimum=TXT_TTL // scale, soa_ttl=TXT_TTL // scale)
        with Upstream(ca, ["*.example.test"], host="127.0.0.2") as upstream:
            sidecar = Sidecar(
                dns.port,
                [
                    "--allow-address",
                    "127.0.0.0/8",
                    "--no-probe",
                    "--min-ttl",
                    f"{MIN_TTL / scale:g}s",
                    "--dns-timeout",
                    "2s",
                ],
                log_dir=Path(scratch),
            ).start()
            try:
                connections = 0
                ends = time.monotonic() + args.seconds
                while time.monotonic() < ends:
                    if sidecar.tunnel_opens(f"{NAME}:{upstream.port}"):
                        connections += 1
                    time.sleep(0.25)
            finally:
                sidecar.stop()
        per_hour = 3600.0 / (args.seconds * scale)
        counts = {t: dns.query_count(rrtype=t) for t in ("TXT", "SRV", "A", "AAAA")}
        print(
            json.dumps(
                {
                    "connections": connections,
                    "queries_in_run": counts,
                    "queries_per_hour": {t: round(n * per_hour) for t, n in counts.items()},
                    "total_per_hour": round(sum(counts.values()) * per_hour),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
