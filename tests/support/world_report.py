"""What a test world with many processes reports: every piece's log on a failure, and the
figures its tests measured, after the run (tests/e2e and tests/scale share this)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import pytest

LOG_LIMIT = 30000  # characters of each log attached to a failing test


def start_failure(what: str, error: Exception, logs: Mapping[str, str]) -> str:
    """Why a world did not start, with the end of every log."""
    text = "\n\n".join(f"--- {k} ---\n{v[-LOG_LIMIT:]}" for k, v in logs.items())
    return f"the {what} did not start: {error}\n{text}"


class HasLogs(Protocol):
    def logs(self) -> Mapping[str, str]: ...


def attach_logs_on_failure(request: pytest.FixtureRequest, fixture: str, label: str) -> None:
    """After a failed test that used the world `fixture`, append each of its logs to the
    report."""
    report = getattr(request.node, "rep_call", None)
    if report is None or not report.failed or fixture not in request.fixturenames:
        return
    world: HasLogs = request.getfixturevalue(fixture)
    for name, text in world.logs().items():
        report.sections.append((f"{label}: {name}", text[-LOG_LIMIT:] or "<empty>"))


class Measurements:
    """Figures recorded by the tests (`record(topic, text)`), printed in the terminal
    summary under `title` and written to the file named by `env_var`, if set."""

    def __init__(self, title: str, env_var: str) -> None:
        self.title = title
        self.env_var = env_var
        self.lines: list[tuple[str, str]] = []

    def record(self, topic: str, text: str) -> None:
        self.lines.append((topic, text))

    def summary(self, terminalreporter: object) -> None:
        if not self.lines:
            return
        write = getattr(terminalreporter, "write_line", None) or (
            lambda s: print(s, file=sys.stderr)
        )
        getattr(terminalreporter, "section", lambda *a, **k: None)(self.title)
        for topic, text in self.lines:
            write(f"{topic}: {text}")
        out = os.environ.get(self.env_var)
        if out:
            Path(out).write_text("\n".join(f"{t}: {x}" for t, x in self.lines) + "\n")
