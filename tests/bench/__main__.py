"""`python -m tests.bench`: run the benchmarks and print the Markdown table."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from tests.bench.harness import SCENARIOS, BenchError, Config
from tests.support import ProcessStartError

DESCRIPTION = """\
Benchmark tombstone-sidecar against bare mitmdump and against no proxy, side by side in one
run: alternating rounds, medians and ratios, printed as a Markdown table with the machine,
versions, date and this command. Scenarios: connect (suppressed CONNECTs/s, with squid
as the anchor where it is installed: apt-get install squid), decision
(cached decision time, in-process), passthrough (new TLS tunnels and pooled tunnels),
cold (new names against a DNS server with latency), memory (RSS per cached verdict),
intercept (intercept mode vs intercepting mitmdump, pooled keep-alive tunnels), mission
(real Synapse: traffic reaching dead servers with and without the sidecar; needs root),
storm (10,000 first-contact names at once: query sets, in-flight bound, live latency).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=DESCRIPTION)
    parser.add_argument("--rounds", type=int, help="rounds per comparison (default 3; quick 2)")
    parser.add_argument(
        "--seconds", type=float, help="seconds per measurement (default 3; quick 1)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="short run (about a minute): fewer, shorter rounds"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (repeatable)",
    )
    parser.add_argument("--concurrency", type=int, default=32, help="CONNECT flood workers")
    parser.add_argument("--tls-concurrency", type=int, default=16, help="new-tunnel workers")
    parser.add_argument("--pooled-connections", type=int, default=4, help="pooled tunnels")
    parser.add_argument("--cold-names", type=int, help="names per cold burst (default 200)")
    parser.add_argument(
        "--storm-names", type=int, help="first-contact names in the join storm (default 10000)"
    )
    parser.add_argument(
        "--storm-concurrency",
        type=int,
        default=1_000,
        help="CONNECTs the join storm holds open at once (default 1000)",
    )
    parser.add_argument(
        "--memory",
        type=int,
        action="append",
        help="verdict counts for the RSS figure (repeatable; default 100000 and 1000000)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        help="re-measure a run while other processes used over half a CPU, at most this "
        "often (default 1; quick 0)",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="after the rounds, profile one extra run per proxy with py-spy; stacks go to DIR",
    )
    parser.add_argument(
        "--no-addon-variant",
        action="store_true",
        help="skip the sidecar addon in stock mitmdump (-s addons/tombstone.py)",
    )
    parser.add_argument(
        "--compare-rev",
        metavar="REV",
        help="connect scenario: also run the sidecar of this git revision (its sidecar/ "
        "exported into the run's temp dir), side by side: before and after a change",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--output", type=Path, help="also write the Markdown table here")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(raw)
    quick = args.quick
    config = Config(
        rounds=args.rounds or (2 if quick else 3),
        seconds=args.seconds or (1.0 if quick else 3.0),
        concurrency=args.concurrency,
        tls_concurrency=args.tls_concurrency,
        pooled_connections=args.pooled_connections,
        cold_names=args.cold_names or (100 if quick else 200),
        storm_names=args.storm_names or (2_000 if quick else 10_000),
        storm_concurrency=args.storm_concurrency,
        decision_calls=50_000 if quick else 200_000,
        hook_calls=5_000 if quick else 20_000,
        memory_counts=tuple(args.memory) if args.memory else (100_000, 1_000_000),
        warmup=0.3 if quick else 0.5,
        retries=args.retries if args.retries is not None else (0 if quick else 1),
        pin=not args.no_pin,
        py_spy=args.py_spy,
        addon_variant=not args.no_addon_variant,
        compare_rev=args.compare_rev,
        scenarios=tuple(args.only) if args.only else SCENARIOS,
        command=shlex.join(["python", "-m", "tests.bench", *raw]),
        verbose=not args.quiet,
    )
    if config.rounds < 1 or config.seconds <= 0:
        print("python -m tests.bench: --rounds and --seconds must be positive", file=sys.stderr)
        return 2
    from tests.bench.harness import Bench

    try:
        report = Bench(config).run()
    except (BenchError, ProcessStartError) as e:
        print(f"python -m tests.bench: error: {e}", file=sys.stderr)
        return 1
    text = report.markdown()
    print(text)
    if args.output is not None:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
