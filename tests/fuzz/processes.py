"""A real sidecar process for the socket fuzzers, under the loopback-only guard."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from tests.fuzz.loopback_only import GUARD_MARK
from tests.support.procs import ManagedProcess
from tests.support.sidecar_process import CRASH_MARKS, Sidecar, sidecar_command

REPO = Path(__file__).resolve().parents[2]


class GuardedSidecar(Sidecar):
    """`tests.support.sidecar_process.Sidecar`, run through `tests.fuzz.loopback_only`."""

    def __init__(self, dns_port: int, args: Sequence[str], log_dir: Path) -> None:
        super().__init__(dns_port, args, env={"PYTHONPATH": str(REPO)}, log_dir=log_dir)
        command = sidecar_command()
        self.argv = [sys.executable, "-m", "tests.fuzz.loopback_only", *self.argv[len(command) :]]
        self.process = ManagedProcess(
            self.argv, env={"PYTHONPATH": str(REPO)}, cwd=REPO, log_path=self._log_path()
        )
        self._log_seen = 0

    def start(self) -> GuardedSidecar:
        super().start()
        return self

    def new_log(self) -> str:
        """The log written since the last call."""
        text = self.log()
        fresh, self._log_seen = text[self._log_seen :], len(text)
        return fresh

    @staticmethod
    def crashes(text: str) -> list[str]:
        """Lines of `text` that show a crash."""
        return [line for line in text.splitlines() if any(m in line for m in CRASH_MARKS)]

    @staticmethod
    def guarded(text: str) -> bool:
        """Whether the loopback-only guard refused a connection (a public IP literal)."""
        return GUARD_MARK in text
