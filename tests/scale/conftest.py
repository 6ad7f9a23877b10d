"""The `scale_world` fixture: a real Synapse among N fake remote servers (tests/scale/world.py).

Sized for CI by default; `SIDECAR_TEST_SCALE_COUNT` (remote servers), `SIDECAR_TEST_SCALE_MODE`
(direct, mitmdump, sidecar, intercept), `SIDECAR_TEST_SCALE_PARTIAL=1` (the hub answers Synapse's
partial-state joins) and `SIDECAR_TEST_SCALE_DEAD_SHARE` change it; `python -m
tests.scale.run` runs the same scenario at any size outside pytest. Needs root (a private
network namespace) and the Synapse virtualenv, like tests/e2e.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from tests.scale.population import DEFAULT_DEAD_SHARE, Population
from tests.scale.world import MODES, ROOT, ScaleWorld
from tests.support.netns import NamespaceError, check_prerequisites
from tests.support.synapse_server import find_venv
from tests.support.world_report import Measurements, attach_logs_on_failure, start_failure

CI_COUNT = 200  # remote servers in CI: every dead kind well represented, a join in seconds


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
            problem = start_failure("scale world", e, world.logs())
        if problem:
            pytest.fail(problem, pytrace=False)
        yield world
    finally:
        world.stop()


@pytest.fixture(autouse=True)
def _scale_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """Attach every piece's log to a failing test's report."""
    yield
    attach_logs_on_failure(request, "scale_world", "scale world")


MEASUREMENTS = Measurements("scale measurements", "SIDECAR_TEST_SCALE_REPORT")


@pytest.fixture
def record() -> Callable[[str, str], None]:
    """`record(topic, text)`: a measured figure, shown in the terminal summary."""
    return MEASUREMENTS.record


def pytest_terminal_summary(terminalreporter: object, exitstatus: int, config: object) -> None:
    MEASUREMENTS.summary(terminalreporter)
