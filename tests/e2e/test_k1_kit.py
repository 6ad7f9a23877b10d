"""k1: a server retired with the decommissioning kit, seen by a real Synapse.

The retiring operator's side is real: `tombstone-sidecar tombstone` prints the nginx
snippet, a real nginx serves it (TLS from the world's CA) for `kit.test`, whose DNS
carries no tombstone at all, so only the 410s tell. The honouring side is the default
deployment: a pass-through sidecar with its probes on, and a fresh Synapse behind it.
What must hold: the sidecar learns the 410 from its own probe, then nothing more from
this Synapse reaches the retired server, and users get fast local answers.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import pytest

from tests.e2e.actions import join, profile, suppressed
from tests.e2e.actions import verdict as verdict_of
from tests.e2e.intercept import Behind, start_behind
from tests.e2e.world import World
from tests.support.procs import wait_until
from tests.support.sidecar_process import sidecar_command
from tests.support.web_servers import Nginx

KIT_NAME = "kit.test"
KIT_IP = "127.0.2.4"  # a dead remote of its own: its nginx log is what reached it
MAX_AGE = 7 * 86400
CLIENT_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def retired(world: World) -> Iterator[Nginx]:
    """kit.test: A record only, and nginx answering with the kit's generated snippet."""
    generated = subprocess.run(
        [
            *sidecar_command(),
            "tombstone",
            KIT_NAME,
            "--only",
            "nginx",
            "--max-age",
            "7d",
            "--successor",
            "live.test",
            "--date",
            "2026-11-27",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    world.zone.add(KIT_NAME, "A", KIT_IP)
    server = Nginx(world.directory / "kit-nginx", world.ca, KIT_NAME, KIT_IP, (443, 8448))
    server.start(generated.stdout)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def behind(world: World, retired: Nginx) -> Behind:
    return start_behind(
        world, "synapse-kit", ["--probe", "--upstream-ca", str(world.ca.ca_pem_path)]
    )


def test_a_kit_retired_server_is_learnt_by_probe_then_never_reached_again(
    behind: Behind, retired: Nginx, record: Callable[[str, str], None]
) -> None:
    user, alias = f"@carol:{KIT_NAME}", f"#lobby:{KIT_NAME}"
    with behind.synapse.client(behind.account, timeout=CLIENT_TIMEOUT) as client:
        first = profile(client, user)  # first sight: the CONNECT passes, the probe starts
        assert wait_until(
            lambda: verdict_of(behind.sidecar, KIT_NAME).get("signal") == "http_410", timeout=15
        ), verdict_of(behind.sidecar, KIT_NAME)
        verdict = verdict_of(behind.sidecar, KIT_NAME)
        reached_before = retired.requests()
        before = suppressed(behind.sidecar).get("http_410", 0.0)

        later = [profile(client, user), join(client, alias), profile(client, user)]

    assert verdict["expires_at"] - verdict["observed_at"] == pytest.approx(MAX_AGE)
    assert any("/.well-known/matrix/server" in line for line in reached_before)
    assert retired.requests() == reached_before  # nothing after the verdict
    assert all(outcome.status >= 400 for outcome in later), later
    assert suppressed(behind.sidecar).get("http_410", 0.0) > before
    record(
        "k1 kit",
        f"{KIT_NAME} retired with the kit's nginx snippet: verdict http_410 for "
        f"{MAX_AGE // 86400} d from the sidecar's probe; requests that reached nginx before "
        f"it: {len(reached_before)} ({'; '.join(_requests(reached_before))}); after: 0; "
        f"first profile {first}; then " + ", ".join(str(o) for o in later),
    )


def _requests(access_log: list[str]) -> list[str]:
    """`GET /path status (client)` of each access-log line (nginx's combined format)."""
    out = []
    for line in access_log:
        parts = line.split('"')
        if len(parts) > 5:
            request, status = parts[1].rsplit(" ", 1)[0], parts[2].split()[0]
            client = (parts[5].split() or ["-"])[0]
            out.append(f"{request} {status} ({client})")
    return out
