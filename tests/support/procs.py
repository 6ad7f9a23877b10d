"""Subprocess helpers for end-to-end tests of the sidecar binary.

The proxy runs as a real process, so tests need to know when it is ready
(port accepts), see why it died (log tail in the error), and never leak it
or its children (whole process group killed, SIGKILL after a grace period).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType


class ProcessStartError(RuntimeError):
    """The process died or never became ready; message includes its log tail."""


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port that was free a moment ago (racy by nature; bind quickly)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    """True if a TCP connect to (host, port) succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# How long wait_until polls unless told: every caller waits for something that must happen
# (`assert wait_until(...)`), so this bounds only a failure's wait, never a passing test's.
# 2 s was missed by a sidecar process on a machine whose CPUs were busy with other work.
WAIT_UNTIL_SECONDS = 10.0


def wait_until(
    predicate: Callable[[], bool], timeout: float = WAIT_UNTIL_SECONDS, interval: float = 0.01
) -> bool:
    """Poll ``predicate`` until it is true; servers update counters asynchronously.

    Meant for what must happen; to show that something does not, wait for an event that
    comes after it instead (a timeout here would be a guess at the machine's pace)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def _tail(path: Path | None, lines: int) -> str:
    if path is None or not path.exists():
        return "<no log>"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:]) or "<empty log>"


def wait_for_port(
    port: int,
    host: str = "127.0.0.1",
    timeout: float = 10.0,
    proc: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Block until (host, port) accepts TCP, failing fast if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise ProcessStartError(
                f"process {proc.args!r} exited with {proc.returncode} before "
                f"{host}:{port} opened; log tail:\n{_tail(log_path, 40)}"
            )
        if port_open(port, host, timeout=0.2):
            return
        if time.monotonic() >= deadline:
            raise ProcessStartError(
                f"{host}:{port} not accepting after {timeout}s; log tail:\n{_tail(log_path, 40)}"
            )
        time.sleep(0.02)


def terminate_process_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> int:
    """SIGTERM the process group, SIGKILL whatever is left after ``grace``.

    Meant for processes started with ``start_new_session=True`` (their pgid
    is their pid); returns the leader's exit code.
    """
    try:
        pgid: int | None = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = proc.pid  # leader already reaped; its children may remain
    if pgid == os.getpgid(0):
        pgid = None  # never signal our own group (that is pytest itself)
    deadline = time.monotonic() + grace
    _signal(proc, pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    while pgid is not None and _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)
    _signal(proc, pgid, signal.SIGKILL)
    proc.wait()
    return proc.returncode


def _group_alive(pgid: int) -> bool:
    """True while the group has a live (non-zombie) member.

    Zombies are ignored: orphans are reaped by PID 1 at its own pace, which
    in containers can take a second and must not eat the grace period.
    """
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def _signal(proc: subprocess.Popen[bytes], pgid: int | None, sig: signal.Signals) -> None:
    try:
        if pgid is not None:
            os.killpg(pgid, sig)
        elif proc.poll() is None:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


class ManagedProcess:
    """A subprocess in its own session whose output goes to a log file.

    ``log_path`` stays on the object so a failing test can print it; use
    ``log_text()`` / ``log_tail()`` or just read the file.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        log_path: str | Path | None = None,
        inherit_env: bool = True,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.cwd = cwd
        self.env = dict(os.environ) if inherit_env else {}
        self.env.update(env or {})
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="proc-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopped = False

    def start(self) -> ManagedProcess:
        """Launch the process (stdout+stderr -> log file, stdin closed)."""
        if self.proc is not None:
            raise RuntimeError("already started")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        """PID (and process-group id) of the started process."""
        return self._require().pid

    @property
    def returncode(self) -> int | None:
        """Exit code, or None while running."""
        return self._require().poll()

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def _require(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise RuntimeError("process not started")
        return self.proc

    def wait_for_port(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        """Wait until the process listens on (host, port); raise with log tail."""
        wait_for_port(port, host, timeout, proc=self._require(), log_path=self.log_path)

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait for a regex to appear in the log (e.g. a 'listening' line)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        proc = self._require()
        while True:
            match = regex.search(self.log_text())
            if match:
                return match
            if proc.poll() is not None:
                raise ProcessStartError(
                    f"process exited with {proc.returncode} before logging "
                    f"{pattern!r}; log tail:\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise ProcessStartError(
                    f"{pattern!r} not logged after {timeout}s; log tail:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def log_text(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        """Last ``lines`` lines of output, for assertion messages."""
        return _tail(self.log_path, lines)

    def stop(self, grace: float = 5.0) -> int | None:
        """Terminate the whole process group; returns the exit code."""
        if self.proc is None:
            return None
        if not self._stopped:
            terminate_process_group(self.proc, grace)
            self._stopped = True
        return self.proc.returncode

    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Read until the peer closes (or resets): (True, what arrived) when it does within
    `seconds`, else (False, what arrived)."""
    received = b""
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except OSError:
            return True, received
        if not chunk:
            return True, received
        received += chunk
    return False, received
