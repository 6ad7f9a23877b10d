"""The `scale_world` fixture: a real Synapse among N fake remote servers (tests/scale/world.py).

Sized for CI by default; `SIDECAR_TEST_SCALE_COUNT` (remote servers), `SIDECAR_TEST_SCALE_MODE`
(direct, mitmdump, sidecar, intercept), `SIDECAR_TEST_SCALE_PARTIAL=1` (the hub answers Synapse's
partial-state joins) and `SIDECAR_TEST_SCALE_DEAD_SHARE` change it; `python -m
tests.scale.run` runs the same scenario at any size outside pytest. Needs root (a private
network namespace) and the Synapse virtualenv, like tests/e2e.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.scale.population import DEFAULT_DEAD_SHARE, Population
from tests.scale.world import MODES, ROOT, ScaleWorld
from tests.support.netns import NamespaceError, check_prerequisites
from tests.support.synapse_server import find_venv

CI_COUNT = 200  # remote servers in CI: every dead kind well represented, a join in seconds
LOG_LIMIT = 30000  # characters of each log attached to a failing test


def settings() -> tuple[int, str, bool, float]:
    count = int(os.environ.get("SIDECAR_TEST_SCALE_COUNT", CI_COUNT))
    mode = os.environ.get("SIDECAR_TEST_SCALE_MODE", "sidecar")
    if mode not in MODES:
        raise pytest.UsageError(f"SIDECAR_TEST_SCALE_MODE={mode!r}: one of {MODES}")
    partial = os.environ.get("SIDECAR_TEST_SCALE_PARTIAL", "") == "1"
    share = float(os.environ.get("SIDECAR_TEST_SCALE_DEAD_SHARE", DEFAULT_DEAD_SHARE))
    return count, mode, partial, share


@pytest.fixture(scope="package")
def scale_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScaleWorld]:
    try:
        check_prerequisites()
        venv = find_venv(ROOT)
    except (NamespaceError, FileNotFoundError) as e:
        pytest.fail(f"cannot start the scale world: {e}", pytrace=False)
    count, mode, partial, share = settings()
    directory = tmp_path_factory.mktemp("scale")
    world = ScaleWorld(
        directory,
        Population(count, share),
        mode=mode,
        partial_state=partial,
        synapse_venv=venv,
    )
    problem = ""
    try:
        try:
            world.start()
        except Exception as e:  # report with every log, after cleaning up (finally)
            logs = "\n\n".join(f"--- {k} ---\n{v[-LOG_LIMIT:]}" for k, v in world.logs().items())
            problem = f"the scale world did not start: {e}\n{logs}"
        if problem:
            pytest.fail(problem, pytrace=False)
        yield world
    finally:
        world.stop()


@pytest.fixture(autouse=True)
def _scale_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """Attach every piece's log to a failing test's report."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is None or not report.failed or "scale_world" not in request.fixturenames:
        return
    world: ScaleWorld = request.getfixturevalue("scale_world")
    for name, text in world.logs().items():
        report.sections.append((f"scale world: {name}", text[-LOG_LIMIT:] or "<empty>"))


MEASUREMENTS: list[tuple[str, str]] = []


@pytest.fixture
def record() -> Callable[[str, str], None]:
    """`record(topic, text)`: a measured figure, shown in the terminal summary."""

    def add(topic: str, text: str) -> None:
        MEASUREMENTS.append((topic, text))

    return add


def pytest_terminal_summary(terminalreporter: object, exitstatus: int, config: object) -> None:
    if not MEASUREMENTS:
        return
    write = getattr(terminalreporter, "write_line", None) or (lambda s: print(s, file=sys.stderr))
    getattr(terminalreporter, "section", lambda *a, **k: None)("scale measurements")
    for topic, text in MEASUREMENTS:
        write(f"{topic}: {text}")
    out = os.environ.get("SIDECAR_TEST_SCALE_REPORT")
    if out:
        Path(out).write_text("\n".join(f"{t}: {x}" for t, x in MEASUREMENTS) + "\n")
