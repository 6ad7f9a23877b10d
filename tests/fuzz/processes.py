"""A real sidecar process for the socket fuzzers, under the loopback-only guard."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.fuzz.loopback_only import GUARD_MARK
from tests.support.procs import ManagedProcess
from tests.support.sidecar import Sidecar, sidecar_command

REPO = Path(__file__).resolve().parents[2]
# What a crash inside the sidecar leaves in its log: a hook that raised (mitmproxy logs
# "Addon error"), an ops handler that raised ("Unhandled error in task"), any traceback.
CRASH_MARKS = ("Traceback (most recent call last)", "Addon error", "Unhandled error")


class GuardedSidecar(Sidecar):
    """`tests.support.sidecar.Sidecar`, run through `tests.fuzz.loopback_only`."""

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


def exchange(
    port: int,
    data: bytes,
    *,
    half_close: bool,
    timeout: float,
) -> tuple[bytes, bool, float]:
    """Send `data` on a fresh loopback connection and read until the peer closes.

    Returns (everything received, whether the peer closed or reset, seconds taken). With
    `half_close` our write side is shut right after sending: the peer sees end of input.
    Stops reading at `timeout` (then `closed` is False: the peer hung).
    """
    started = time.monotonic()
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # the peer may close before taking everything: that is an answer
            pass
        deadline = started + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return received, False, time.monotonic() - started
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return received, False, time.monotonic() - started
            except OSError:  # reset by peer
                return received, True, time.monotonic() - started
            if not chunk:
                return received, True, time.monotonic() - started
            received += chunk
            if len(received) > 1 << 20:
                raise AssertionError(f"more than 1 MiB in answer to {data[:200]!r}")
