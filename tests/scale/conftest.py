"""The scale worlds: a real Synapse among N fake remote servers (tests/scale/world.py).

`scale_world` (scenarios 1 and 2) runs in one mode, the sidecar in pass-through unless told;
`later_world` (scenario 3) is a world of its own, because Synapse's compressed retry
settings apply from its start, once in each sidecar mode (pass-through and intercept)
unless a mode is named. Sized for CI by default; `SIDECAR_TEST_SCALE_COUNT` (remote
servers), `SIDECAR_TEST_SCALE_MODE` (direct, mitmdump, sidecar, intercept: the one mode of
both worlds), `SIDECAR_TEST_SCALE_PARTIAL=1` (the hub answers Synapse's partial-state
joins) and `SIDECAR_TEST_SCALE_DEAD_SHARE` change them; `python -m tests.scale.run` runs the
same scenarios at any size outside pytest. Needs root (a private network namespace) and the
Synapse virtualenv, like tests/e2e. The two worlds never run at once (each is
module-scoped): the test process's thread enters one world's network namespace at a time.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import pytest

from tests.scale.population import DEFAULT_DEAD_SHARE, Population
from tests.scale.world import MODES, ROOT, ScaleWorld
from tests.support.netns import NamespaceError, check_prerequisites
from tests.support.synapse_server import find_venv
from tests.support.world_report import Measurements, attach_logs_on_failure, start_failure

CI_COUNT = 200  # remote servers in CI: every dead kind well represented, a join in seconds
LATER_MODES = ("sidecar", "intercept")  # scenario 3: both sidecar modes unless one is named


def settings() -> tuple[int, str, bool, float]:
    count = int(os.environ.get("SIDECAR_TEST_SCALE_COUNT", CI_COUNT))
    mode = os.environ.get("SIDECAR_TEST_SCALE_MODE", "sidecar")
    if mode not in MODES:
        raise pytest.UsageError(f"SIDECAR_TEST_SCALE_MODE={mode!r}: one of {MODES}")
    partial = os.environ.get("SIDECAR_TEST_SCALE_PARTIAL", "") == "1"
    share = float(os.environ.get("SIDECAR_TEST_SCALE_DEAD_SHARE", DEFAULT_DEAD_SHARE))
    return count, mode, partial, share


def later_modes() -> tuple[str, ...]:
    """The modes scenario 3 runs in: the one named, else both sidecar modes."""
    named = os.environ.get("SIDECAR_TEST_SCALE_MODE")
    return (named,) if named else LATER_MODES


@contextmanager
def running_world(
    tmp_path_factory: pytest.TempPathFactory,
    mode: str,
    synapse_config: dict[str, Any] | None = None,
) -> Iterator[ScaleWorld]:
    """A started world of the configured size in `mode`, stopped on the way out."""
    try:
        check_prerequisites()
        venv = find_venv(ROOT)
    except (NamespaceError, FileNotFoundError) as e:
        pytest.fail(f"cannot start the scale world: {e}", pytrace=False)
    count, _, partial, share = settings()
    if mode not in MODES:
        raise pytest.UsageError(f"SIDECAR_TEST_SCALE_MODE={mode!r}: one of {MODES}")
    directory = tmp_path_factory.mktemp(f"scale-{mode}")
    world = ScaleWorld(
        directory,
        Population(count, share),
        mode=mode,
        partial_state=partial,
        synapse_venv=venv,
        synapse_config=synapse_config,
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


@pytest.fixture(scope="module")
def scale_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScaleWorld]:
    """Scenarios 1 and 2: Synapse with its own retry schedule."""
    with running_world(tmp_path_factory, settings()[1]) as world:
        yield world


@pytest.fixture(scope="module", params=later_modes())
def later_mode(request: pytest.FixtureRequest) -> str:
    """The mode of scenario 3's world (tests/scale/test_scale_later.py builds it)."""
    mode: str = request.param
    return mode


WorldFactory = Callable[[str, dict[str, Any]], AbstractContextManager[ScaleWorld]]


@pytest.fixture(scope="module")
def world_factory(tmp_path_factory: pytest.TempPathFactory) -> WorldFactory:
    """`with world_factory(mode, synapse_config) as world:` a world of the configured size."""
    return functools.partial(running_world, tmp_path_factory)


@pytest.fixture(autouse=True)
def _scale_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """Attach every piece's log to a failing test's report."""
    yield
    attach_logs_on_failure(request, "scale_world", "scale world")
    attach_logs_on_failure(request, "later_world", "scale world (scenario 3)")


MEASUREMENTS = Measurements("scale measurements", "SIDECAR_TEST_SCALE_REPORT")


@pytest.fixture
def record() -> Callable[[str, str], None]:
    """`record(topic, text)`: a measured figure, shown in the terminal summary."""
    return MEASUREMENTS.record


def pytest_terminal_summary(terminalreporter: object, exitstatus: int, config: object) -> None:
    MEASUREMENTS.summary(terminalreporter)
