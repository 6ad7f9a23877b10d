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
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.actions import create_room
from tests.e2e.world import HOSTS, ROOT, SIDECAR_ARGS_ENV, World
from tests.support.netns import Namespace, NamespaceError, check_prerequisites
from tests.support.synapse_server import find_venv

LOG_LIMIT = 30000  # characters of each log attached to a failing test
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
            logs = "\n\n".join(f"--- {k} ---\n{v[-LOG_LIMIT:]}" for k, v in built.logs().items())
            problem = f"the e2e world did not start: {e}\n{logs}"
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
    report = getattr(request.node, "rep_call", None)
    if report is None or not report.failed or "world" not in request.fixturenames:
        return
    built: World = request.getfixturevalue("world")
    for name, text in built.logs().items():
        report.sections.append((f"world: {name}", text[-LOG_LIMIT:] or "<empty>"))


# -- measurements: printed after the run, the numbers the README's tables come from --------

MEASUREMENTS: list[tuple[str, str]] = []


@pytest.fixture
def record() -> Callable[[str, str], None]:
    """`record(topic, text)`: a measured number, shown in the terminal summary."""

    def add(topic: str, text: str) -> None:
        MEASUREMENTS.append((topic, text))

    return add


def pytest_terminal_summary(terminalreporter: object, exitstatus: int, config: object) -> None:
    if not MEASUREMENTS:
        return
    write = getattr(terminalreporter, "write_line", None) or (lambda s: print(s, file=sys.stderr))
    getattr(terminalreporter, "section", lambda *a, **k: None)("e2e measurements (real Synapse)")
    for topic, text in MEASUREMENTS:
        write(f"{topic}: {text}")
    out = os.environ.get("SIDECAR_TEST_E2E_REPORT")
    if out:
        Path(out).write_text("\n".join(f"{t}: {x}" for t, x in MEASUREMENTS) + "\n")


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
