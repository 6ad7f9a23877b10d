"""Shared by every test package: the call-phase report, and a session that leaves no trace.

Issue 13: a run once put verdicts into the real user's
`$XDG_STATE_HOME/tombstone-sidecar/verdicts.sqlite3` (a sidecar started without
`--state-dir`), which the next `scripts/run` loaded, and left `/tmp/proc-*.log`,
`/tmp/sidecar-state-*`, `/tmp/redis-*` and `/tmp/atheris-config-*` behind. So the whole
session, and every process it starts, gets a private HOME, XDG directories and TMPDIR
under pytest's own temporary directory; and the run fails if the real state directory
changed or one of those names appeared in the real temporary directory anyway.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

from sidecar.store.base import default_state_dir

# Hypothesis keeps its example database in pytest's cache for every suite (tests/unit has
# property tests too), not in a `.hypothesis` directory in the checkout.
set_hypothesis_home_dir(str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "hypothesis"))

# What earlier runs left in the real temporary directory; none may appear during a run.
LEAK_PATTERNS = ("atheris-config-*", "proc-*.log", "sidecar-state-*", "redis-*")
PRIVATE_ENV = (
    "HOME",
    "XDG_STATE_HOME",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
    "XDG_CACHE_HOME",
    "TMPDIR",
)

Snapshot = dict[str, tuple[int, int]] | None


class Hygiene:
    """Where the real user's state and temporary files are, and what they held at start."""

    def __init__(self) -> None:
        self.state_dir = Path(default_state_dir())  # computed before any override
        self.temp_dir = Path(tempfile.gettempdir())
        self.state_before = snapshot(self.state_dir)
        self.temp_before = leftovers(self.temp_dir)

    def problems(self) -> list[str]:
        found = []
        if snapshot(self.state_dir) != self.state_before:
            found.append(
                f"the real state directory {self.state_dir} changed during the run: a "
                "sidecar was started without --state-dir and outside the session's "
                "private XDG_STATE_HOME"
            )
        for path in sorted(leftovers(self.temp_dir) - self.temp_before):
            found.append(
                f"{path} was left in the real temporary directory; create it under "
                "tmp_path (or tempfile, which the session points at a private TMPDIR) "
                "and remove it"
            )
        return found


def snapshot(directory: Path) -> Snapshot:
    """Every file under `directory` with its size and mtime; None when it does not exist."""
    if not directory.exists():
        return None
    files = {}
    for path in directory.rglob("*"):
        try:
            stat = path.lstat()
        except OSError:
            continue
        files[str(path.relative_to(directory))] = (stat.st_size, stat.st_mtime_ns)
    return files


def leftovers(directory: Path) -> set[Path]:
    return {path for pattern in LEAK_PATTERNS for path in directory.glob(pattern)}


_HYGIENE = pytest.StashKey[Hygiene]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_HYGIENE] = Hygiene()


@pytest.fixture(scope="session", autouse=True)
def private_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """HOME, XDG_* and TMPDIR of this process and every child point into pytest's
    temporary directory for the whole session (restored at its end). pip keeps reading
    the real user's configuration (its local package index) through PIP_CONFIG_FILE."""
    root = tmp_path_factory.mktemp("session-home")
    saved = {name: os.environ.get(name) for name in (*PRIVATE_ENV, "PIP_CONFIG_FILE")}
    saved_tempdir = tempfile.tempdir
    pip_config = Path.home() / ".config" / "pip" / "pip.conf"
    if "PIP_CONFIG_FILE" not in os.environ and pip_config.is_file():
        os.environ["PIP_CONFIG_FILE"] = str(pip_config)
    for name in PRIVATE_ENV:
        path = root / name.lower()
        path.mkdir()
        os.environ[name] = str(path)
    tempfile.tempdir = os.environ["TMPDIR"]
    try:
        yield root
    finally:
        tempfile.tempdir = saved_tempdir
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when a test wrote to the real state directory or left files in the
    real temporary directory (checked after every fixture has stopped its processes)."""
    hygiene = session.config.stash.get(_HYGIENE, None)
    if hygiene is None:
        return
    problems = hygiene.problems()
    if not problems:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for problem in problems:
        if reporter is not None:
            reporter.write_line(f"TEST HYGIENE: {problem}", red=True)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep the call-phase report on the item, so fixtures can attach logs to a failure."""
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
