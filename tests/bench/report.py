"""The benchmark report: machine facts and one Markdown table of medians and ratios."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Row:
    """One line of the table; `met` is True/False for a goal, None when there is none."""

    scenario: str
    metric: str
    sidecar: str
    baseline: str
    ratio: str
    goal: str = ""
    met: bool | None = None


@dataclass
class Report:
    command: str
    rows: list[Row] = field(default_factory=list)
    details: list[str] = field(default_factory=list)  # per-round values, checks, skips
    machine: dict[str, str] = field(default_factory=dict)

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def note(self, text: str) -> None:
        self.details.append(text)

    def markdown(self) -> str:
        lines = ["## Benchmark results", ""]
        lines += [f"- **{k}**: {v}" for k, v in self.machine.items()]
        lines += [f"- **command**: `{self.command}`", ""]
        lines.append("| scenario | metric | sidecar | baseline | ratio | goal | met |")
        lines.append("|---|---|---:|---:|---:|---|---|")
        for r in self.rows:
            met = {True: "yes", False: "**NO**", None: ""}[r.met]
            lines.append(
                f"| {r.scenario} | {r.metric} | {r.sidecar} | {r.baseline} | {r.ratio} "
                f"| {r.goal} | {met} |"
            )
        lines += [
            "",
            "ratio: sidecar ÷ baseline for rates (higher is better); baseline ÷ sidecar for "
            "proxy CPU per request, marked (b÷s), so above 1 means the sidecar spends less; "
            "(x-y) is the range of the same-round ratios; medians over the rounds.",
        ]
        if self.details:
            lines += ["", "Per-round values and checks:", ""]
            lines += [f"- {d}" for d in self.details]
        return "\n".join(lines) + "\n"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(pinning: str) -> dict[str, str]:
    import mitmproxy.version

    import sidecar

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {platform.platform()}",
        "versions": (
            f"Python {platform.python_version()} ({sys.implementation.name}), "
            f"mitmproxy {mitmproxy.version.VERSION}, tombstone-sidecar {sidecar.__version__}"
        ),
        "pinning": pinning,
    }


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}/s"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}"
