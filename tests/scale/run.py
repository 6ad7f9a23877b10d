"""Run the scale scenario at any size: `python -m tests.scale.run --count 1000` (as root).

Starts the scale world (tests/scale/world.py) in a private namespace, runs the join and
first message, then the fan-out (M messages, typing, a new device; tests/scale/driver.py),
prints every figure as JSON, and stops the world.
`--keep DIR` keeps the world's files (logs, Synapse's database) in DIR.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.scale.driver import fan_out, join_and_send, report
from tests.scale.population import DEFAULT_DEAD_SHARE, Population
from tests.scale.world import MODES, ScaleWorld


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.scale.run", description=__doc__)
    parser.add_argument("--count", type=int, default=1000, help="remote servers (up to 10,000)")
    parser.add_argument("--mode", choices=MODES, default="sidecar")
    parser.add_argument("--dead-share", type=float, default=DEFAULT_DEAD_SHARE)
    parser.add_argument("--partial-state", action="store_true", help="hub honours omit_members")
    parser.add_argument(
        "--messages",
        type=int,
        default=10,
        help="then M messages, a typing notification and a new device (0: skip)",
    )
    parser.add_argument("--delivery-timeout", type=float, default=300.0)
    parser.add_argument("--keep", type=Path, help="keep the world's files in this directory")
    parser.add_argument("--output", type=Path, help="also write the JSON report here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    directory = args.keep or Path(tempfile.mkdtemp(prefix="scale-world-"))
    directory.mkdir(parents=True, exist_ok=True)
    population = Population(args.count, args.dead_share)
    world = ScaleWorld(directory, population, mode=args.mode, partial_state=args.partial_state)
    began = time.monotonic()
    try:
        world.start()
        print(f"scale world up in {time.monotonic() - began:.1f} s: {world.timings}", flush=True)
        run = join_and_send(world, delivery_timeout=args.delivery_timeout)
        fan = None
        if run.join_status == 200 and args.messages > 0:
            fan = fan_out(world, args.messages, timeout=args.delivery_timeout)
        figures = report(world, run)
        if fan is not None:
            figures["fan_out"] = fan.summary()
        text = json.dumps(figures, indent=2, sort_keys=True)
        print(text)
        if args.output:
            args.output.write_text(text + "\n")
        delivered = run.message is not None and len(run.message.arrivals) == run.message.expected
        return 0 if run.join_status == 200 and delivered else 1
    finally:
        world.stop()
        if args.keep is None:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
