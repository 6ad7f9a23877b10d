"""Run the scale scenarios at any size: `python -m tests.scale.run --count 1000` (as root).

Starts the scale world (tests/scale/world.py) in a private namespace, runs the join and
first message, then the fan-out (M messages, typing, a new device; tests/scale/driver.py),
optionally "ten minutes later" (`--later SECONDS`: Synapse's retry schedule compressed by
its own settings, `--time-factor`), prints every figure as JSON, and stops the world.

`--mode` may be given several times (or `--mode all`: direct, mitmdump, sidecar,
intercept), `--repeat K` runs each mode K times (interleaved), and with more than one run
the headline table (medians) is printed in markdown; `--pin` puts Synapse on CPU 0 and
everything else on CPU 1. `--sidecar-arg=--no-probe` (repeatable) passes an argument to
the sidecar, for on/off comparisons. `--keep DIR` keeps the world's files in DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from tests.scale.driver import (
    LATER_MESSAGE_INTERVAL,
    compressed_retries,
    fan_out,
    join_and_send,
    report,
    ten_minutes_later,
)
from tests.scale.population import DEAD_KINDS, DEFAULT_DEAD_SHARE, Population
from tests.scale.world import MODES, ROOT, ScaleWorld
from tests.support.synapse_server import find_venv

DEFAULT_TIME_FACTOR = 10.0  # 10 minutes of Synapse's retry schedule in 60 s


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.scale.run", description=__doc__)
    parser.add_argument("--count", type=int, default=1000, help="remote servers (up to 10,000)")
    parser.add_argument(
        "--mode",
        action="append",
        choices=[*MODES, "all"],
        help="direct, mitmdump, sidecar (default), intercept or all; repeatable",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each mode (medians)")
    parser.add_argument("--pin", action="store_true", help="Synapse on CPU 0, the rest on 1")
    parser.add_argument(
        "--sidecar-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an argument for the sidecar (repeatable; `--sidecar-arg=--no-probe`)",
    )
    parser.add_argument("--dead-share", type=float, default=DEFAULT_DEAD_SHARE)
    parser.add_argument("--partial-state", action="store_true", help="hub honours omit_members")
    parser.add_argument(
        "--messages",
        type=int,
        default=10,
        help="then M messages, a typing notification and a new device (0: skip)",
    )
    parser.add_argument(
        "--later",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="then scenario 3 for this long: a message every 10 s while Synapse retries "
        "(its retry settings compressed by --time-factor for the whole run)",
    )
    parser.add_argument("--time-factor", type=float, default=DEFAULT_TIME_FACTOR)
    parser.add_argument(
        "--later-interval",
        type=float,
        default=LATER_MESSAGE_INTERVAL,
        metavar="SECONDS",
        help="with --later: a message every SECONDS (default 10)",
    )
    parser.add_argument("--delivery-timeout", type=float, default=300.0)
    parser.add_argument("--timelines", action="store_true", help="a few dead names' events")
    parser.add_argument("--keep", type=Path, help="keep the world's files in this directory")
    parser.add_argument("--output", type=Path, help="also write the JSON report here")
    parser.add_argument("--table", type=Path, help="also write the markdown table here")
    return parser.parse_args(argv)


def modes(args: argparse.Namespace) -> list[str]:
    chosen = args.mode or ["sidecar"]
    return list(MODES) if "all" in chosen else list(dict.fromkeys(chosen))


def run_once(args: argparse.Namespace, mode: str, directory: Path) -> tuple[bool, dict[str, Any]]:
    """One world, one mode: every scenario asked for; (success, figures)."""
    population = Population(args.count, args.dead_share)
    synapse_config = compressed_retries(args.time_factor) if args.later > 0 else {}
    world = ScaleWorld(
        directory,
        population,
        mode=mode,
        partial_state=args.partial_state,
        sidecar_args=args.sidecar_arg if mode in ("sidecar", "intercept") else (),
        synapse_config=synapse_config,
        pin_cpus=args.pin,
    )
    began = time.monotonic()
    try:
        world.start()
        print(f"{mode}: world up in {time.monotonic() - began:.1f} s", file=sys.stderr, flush=True)
        run = join_and_send(world, delivery_timeout=args.delivery_timeout)
        fan = None
        if run.join_status == 200 and args.messages > 0:
            fan = fan_out(world, args.messages, timeout=args.delivery_timeout)
        figures = report(world, run)
        if fan is not None:
            figures["fan_out"] = fan.summary()
        if run.join_status == 200 and args.later > 0:
            later = ten_minutes_later(
                world, args.later, args.time_factor, interval=args.later_interval
            )
            figures["later"] = later.summary()
            figures["later"]["dead_reached"] = world.dead_reached(since=later.began)
            figures["later"]["synapse_config"] = synapse_config
            figures["usage"] = world.usage()  # the whole run's CPU
            figures["dns_queries"] = world.dns_queries()
            figures["synapse_log"] = world.synapse_log_counts()
        if args.timelines:
            figures["timelines"] = world.dead_account().timelines()
        figures["sidecar_args"] = list(world.sidecar_args)
        figures["pinned"] = args.pin
        delivered = run.message is not None and len(run.message.arrivals) == run.message.expected
        return run.join_status == 200 and delivered, figures
    finally:
        world.stop()


def environment(argv: Sequence[str]) -> dict[str, str]:
    """What a figure needs next to it: machine, versions, date, the command."""
    synapse = "?"
    with contextlib.suppress(FileNotFoundError):
        python = find_venv(ROOT) / "bin" / "python"
        done = subprocess.run(
            [str(python), "-c", "import synapse; print(synapse.__version__)"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        synapse = done.stdout.strip() or "?"
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "mitmproxy": metadata.version("mitmproxy"),
        "synapse": synapse,
        "command": "scripts/scale " + shlex.join(argv),
    }


# -- the headline table --------------------------------------------------------------------


def _get(figures: dict[str, Any], *path: str) -> Any:
    value: Any = figures
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _proxy(figures: dict[str, Any], what: str) -> Any:
    for name in ("sidecar", "mitmdump"):
        found = _get(figures, "usage", name, what)
        if found is not None:
            return found
    return None


def _proxy_dns(figures: dict[str, Any]) -> Any:
    if figures["mode"] == "mitmdump":
        return _get(figures, "dns_queries", "mitmdump")
    if figures["mode"] in ("sidecar", "intercept"):
        return _get(figures, "dns_queries", "sidecar")
    return None


Getter = Callable[[dict[str, Any]], Any]


def _at(*path: str) -> Getter:
    return lambda figures: _get(figures, *path)


def _each(prefix: tuple[str, ...], *keys: str) -> list[Getter]:
    return [_at(*prefix, key) for key in keys]


def _seconds(*path: str) -> Getter:
    def get(figures: dict[str, Any]) -> Any:
        ms = _get(figures, *path)
        return None if ms is None else ms / 1000

    return get


def _megabytes(get_kb: Getter) -> Getter:
    def get(figures: dict[str, Any]) -> Any:
        kb = get_kb(figures)
        return None if kb is None else kb / 1024

    return get


def _triple(*path: str) -> list[Getter]:
    return [_seconds(*path, f"{p}_ms") for p in ("p50", "p99", "max")]


AFTER = ("syns_after_verdict", "requests_after_verdict")
Row = tuple[str, list[Getter], str]
ROWS: list[Row] = [
    ("join (client's POST /join), s", [_at("join", "seconds")], "{:.2f}"),
    ("state complete (member list), s", [_at("join", "members_complete_seconds")], "{:.2f}"),
    ("first message p50 / p99 / max, s", _triple("message"), "{:.2f}"),
    ("fan-out messages p50 / p99 / max, s", _triple("fan_out"), "{:.2f}"),
    ("typing p50 / p99 / max, s", _triple("fan_out", "typing"), "{:.2f}"),
    ("device-list update p50 / p99 / max, s", _triple("fan_out", "device_list_update"), "{:.2f}"),
    (
        "dead servers: SYNs / requests (join + fan-out)",
        _each(("dead_reached", "total"), "syns", "requests"),
        "{:.0f}",
    ),
    (
        "… after the sidecar's first gone verdict on the name",
        _each(("dead_reached", "total"), *AFTER),
        "{:.0f}",
    ),
    ("dead names never judged gone", [_at("dead_reached", "total", "never_judged_gone")], "{:.0f}"),
    (
        "ten minutes later: dead SYNs / requests",
        _each(("later", "dead_reached", "total"), "syns", "requests"),
        "{:.0f}",
    ),
    ("… after the first gone verdict", _each(("later", "dead_reached", "total"), *AFTER), "{:.0f}"),
    (
        "… dead names Synapse retried after backing them off",
        [_at("later", "dead_reached", "total", "synapse_names_retried")],
        "{:.0f}",
    ),
    (
        "ten minutes later: live deliveries / expected",
        _each(("later",), "deliveries", "expected"),
        "{:.0f}",
    ),
    (
        "Synapse CPU s / peak RSS MB",
        [
            _at("usage", "synapse", "cpu_seconds"),
            _megabytes(_at("usage", "synapse", "vmhwm_kb")),
        ],
        "{:.1f}",
    ),
    (
        "proxy CPU s / RSS MB",
        [lambda f: _proxy(f, "cpu_seconds"), _megabytes(lambda f: _proxy(f, "vmrss_kb"))],
        "{:.1f}",
    ),
    ("DNS queries: Synapse / proxy", [_at("dns_queries", "synapse"), _proxy_dns], "{:.0f}"),
    ("Synapse log: CRITICAL / ERROR lines", _each(("synapse_log",), "critical", "error"), "{:.0f}"),
]


def _median(values: list[Any]) -> Any:
    numbers = [v for v in values if isinstance(v, int | float)]
    return statistics.median(numbers) if numbers else None


def _cell(
    runs: list[dict[str, Any]], getters: list[Callable[[dict[str, Any]], Any]], fmt: str
) -> str:
    parts = []
    for get in getters:
        value = _median([get(f) for f in runs])
        parts.append("-" if value is None else fmt.format(value))
    return " / ".join(parts)


def table(results: dict[str, list[dict[str, Any]]], env: dict[str, str]) -> str:
    """The headline table (medians over each mode's runs) and the per-kind dead counts."""
    order = [m for m in MODES if m in results]
    first = next(iter(results.values()))[0]
    head = (
        f"N = {first['servers']} ({first['live']} live, {first['dead']} dead), "
        f"{max(len(r) for r in results.values())} run(s) per mode, medians"
    )
    lines = [f"| {head} | " + " | ".join(order) + " |", "| --- |" + " --- |" * len(order)]
    for label, getters, fmt in ROWS:
        lines.append(
            f"| {label} | " + " | ".join(_cell(results[m], getters, fmt) for m in order) + " |"
        )
    lines += [
        "",
        "| dead kind: SYNs / requests (after first gone verdict) | " + " | ".join(order) + " |",
    ]
    lines.append("| --- |" + " --- |" * len(order))
    for kind in DEAD_KINDS:
        cells = []
        for mode in order:
            runs = results[mode]
            total = _cell(runs, _each(("dead_reached", kind), "syns", "requests"), "{:.0f}")
            late = _cell(runs, _each(("dead_reached", kind), *AFTER), "{:.0f}")
            cells.append(total if late == "- / -" else f"{total} ({late})")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += ["", *(f"- {k}: {v}" for k, v in env.items())]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    env = environment(argv)
    results: dict[str, list[dict[str, Any]]] = {}
    ok = True
    for round_ in range(args.repeat):
        for mode in modes(args):
            base = args.keep or Path(tempfile.mkdtemp(prefix="scale-world-"))
            directory = base / f"{mode}-{round_}" if args.keep else base
            directory.mkdir(parents=True, exist_ok=True)
            try:
                success, figures = run_once(args, mode, directory)
            finally:
                if args.keep is None:
                    shutil.rmtree(base, ignore_errors=True)
            ok = ok and success
            results.setdefault(mode, []).append(figures)
    everything = {"environment": env, "runs": results}
    text = json.dumps(everything, indent=2, sort_keys=True)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    markdown = table(results, env)
    print(markdown)
    if args.table:
        args.table.write_text(markdown)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
