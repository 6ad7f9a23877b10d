"""The `world` fixture: a real Synapse behind the real sidecar, in a private namespace.

Design (the simplest that is robust):

- A *holder* process is started under `unshare --net --mount` (tests.support.netns). It
  makes the world's mounts private, binds its own resolv.conf (nameserver 127.0.0.1)
  and hosts over /etc inside the namespace only, brings `lo` up and waits.
- The pytest thread then joins the holder's network namespace with setns(2) (per
  thread) for the duration of this package, and leaves it again at teardown. While it
  is inside, the DNS servers, fake remotes and packet counter it starts as threads
  bind inside the world, `httpx` clients in the tests reach Synapse at 127.0.0.1:8008
  of the world, and counters are plain attributes: no control channel is needed.
- Child processes (the sidecar, Synapse) are started through `nsenter --net --mount`
  into the holder, so they also see the world's /etc/resolv.conf.
- Teardown stops every process by PID (whole process group) and every server, even
  when a test or the start itself failed; a failing test gets every piece's log
  attached (Synapse, sidecar, both DNS query logs, what the remotes received).
- Not root, no `unshare`, no Synapse virtualenv: the tests fail with the reason.

Package scope rather than session scope, so the pytest thread is back in the host's
namespace before any other suite runs. `SIDECAR_TEST_E2E_SIDECAR_ARGS` adds sidecar
arguments (e.g. `--no-enforce`, to watch the scenarios fail without suppression).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.e2e.actions import create_room
from tests.e2e.world import HOSTS, ROOT, SIDECAR_ARGS_ENV, World
from tests.support.netns import Namespace, NamespaceError, check_prerequisites
from tests.support.synapse_server import find_venv
from tests.support.world_report import Measurements, attach_logs_on_failure, start_failure

CLIENT_TIMEOUT = 30.0  # Synapse answers in milliseconds here; without the sidecar, not always


@pytest.fixture(scope="package")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    try:
        check_prerequisites()
        venv = find_venv(ROOT)
    except (NamespaceError, FileNotFoundError) as e:
        problem = str(e)
    else:
        problem = ""
    if problem:
        pytest.fail(f"cannot start the e2e world: {problem}", pytrace=False)
    directory = tmp_path_factory.mktemp("world")
    namespace = Namespace(directory)
    extra = shlex.split(os.environ.get(SIDECAR_ARGS_ENV, ""))
    built = World(directory, command_prefix=[], sidecar_args=extra, synapse_venv=venv)
    try:
        try:
            namespace.start(HOSTS)
            namespace.enter_net()
            built.command_prefix = namespace.command([])
            built.start()
        except Exception as e:  # report with every log, after cleaning up (finally)
            problem = start_failure("e2e world", e, built.logs())
        if problem:
            pytest.fail(problem, pytrace=False)
        yield built
    finally:
        built.stop()
        namespace.stop()


@pytest.fixture(autouse=True)
def _world_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """Attach every piece's log to a failing test's report."""
    yield
    attach_logs_on_failure(request, "world", "world")


# -- measurements: printed after the run, the numbers the README's tables come from --------

MEASUREMENTS = Measurements("e2e measurements (real Synapse)", "SIDECAR_TEST_E2E_REPORT")


@pytest.fixture
def record() -> Callable[[str, str], None]:
    """`record(topic, text)`: a measured figure, shown in the terminal summary."""
    return MEASUREMENTS.record


def pytest_terminal_summary(terminalreporter: object, exitstatus: int, config: object) -> None:
    MEASUREMENTS.summary(terminalreporter)


@pytest.fixture(scope="package")
def client(world: World) -> Iterator[httpx.Client]:
    """The world's user `@alice:hs.test`, logged in to the main Synapse."""
    assert world.synapse is not None and world.account is not None
    with world.synapse.client(world.account, timeout=CLIENT_TIMEOUT) as c:
        yield c


@pytest.fixture(scope="package")
def invite_room(client: httpx.Client) -> str:
    """A private room of alice's to invite remote users into."""
    return create_room(client)
