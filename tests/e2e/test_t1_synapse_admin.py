"""The Synapse admin link against the real Synapse of the world (issue 9, part 2).

A second sidecar with `--synapse-admin-url` and the admin token of `@alice:hs.test` (the
world registers her as an admin) talks to the world's real Synapse. It is not Synapse's
proxy (the world's first sidecar is; swapping Synapse's proxy needs a Synapse restart);
what it does to Synapse goes through the real admin API and shows in Synapse's real
`destinations` table:

- resume early: a name gone here that Synapse stops backing off (its retry timings reset,
  which is what inbound traffic from that server does) is re-checked at once, long
  before its 300 s TTL, and lifted because its tombstone is gone;
- reset on lift: an operator lifts a verdict (ops DELETE) while Synapse backs the name off;
  the sidecar's reset_connection clears Synapse's backoff; when Synapse was not backing
  off, Synapse refuses the reset (400) and that is counted as `not_needed`;
- `verdicts list --synapse` shows Synapse's view (backoff, rooms) next to each verdict;
- a wrong token or an unreachable admin API: one WARNING line, a metric, proxying intact.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.e2e.actions import join, send_text
from tests.e2e.world import LIVE_IP, World
from tests.support.procs import wait_until
from tests.support.sidecar_process import Sidecar, sidecar_command

BACK = "resumed.test"  # tombstoned, then back: only this test names it
TIED = "member-txt.test"  # a dead server with a member in rooms Synapse joins
OPS_TOKEN = "admin-e2e-ops-token-0123456789"
ADMIN = "http://127.0.0.1:8008"


def ops(sidecar: Sidecar, method: str, path: str, body: bytes | None = None) -> dict[str, object]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{sidecar.ops_port}{path}", data=body, method=method
    )
    request.add_header("Authorization", f"Bearer {OPS_TOKEN}")
    with urllib.request.urlopen(request, timeout=30) as response:
        result = json.loads(response.read())
    assert isinstance(result, dict)
    return result


def verdict_state(sidecar: Sidecar, name: str) -> str:
    try:
        return str(ops(sidecar, "GET", f"/v1/verdicts/{name}")["state"])
    except urllib.error.HTTPError:
        return "none"


def backing_off(world: World, name: str) -> bool:
    assert world.synapse is not None
    row = world.synapse.destinations().get(name) or {}
    return bool(row.get("retry_interval")) or row.get("failure_ts") is not None


def make_synapse_back_off(world: World, client: httpx.Client) -> None:
    """A join by room ID through the world's sidecar, which refuses BACK: Synapse backs off."""
    assert world.synapse is not None
    outcome = join(client, f"!lobby:{BACK}", via=BACK)
    assert outcome.status >= 400, outcome
    assert world.synapse.wait_for_destination(BACK) is not None, world.synapse.destinations()


def admin_files(world: World, tmp_path: Path) -> tuple[Path, Path]:
    assert world.account is not None
    token = tmp_path / "synapse-admin-token"
    token.write_text(world.account.access_token + "\n")
    ops_token = tmp_path / "ops-token"
    ops_token.write_text(OPS_TOKEN + "\n")
    return token, ops_token


def test_resume_early_reset_on_lift_and_the_joined_listing(
    world: World, client: httpx.Client, tmp_path: Path, record: Callable[[str, str], None]
) -> None:
    assert world.synapse is not None and world.account is not None
    world.zone.add(BACK, "A", LIVE_IP, ttl=300)
    world.zone.add(BACK, "TXT", "v=matrix;gone", ttl=300)
    make_synapse_back_off(world, client)
    token, ops_token = admin_files(world, tmp_path)
    linked = world.start_sidecar(
        [
            "--synapse-admin-url",
            ADMIN,
            "--synapse-admin-token-file",
            str(token),
            "--synapse-admin-poll",
            "0.5s",
            "--ops-token-file",
            str(ops_token),
        ]
    )
    assert not linked.tunnel_opens(f"{BACK}:8448")
    assert verdict_state(linked, BACK) == "gone"

    # Resume early: Synapse stops backing off BACK (what inbound traffic from it does).
    def watched() -> bool:
        return BACK in list(ops(linked, "GET", "/v1/synapse")["backing_off_gone"])  # type: ignore[call-overload]

    assert wait_until(watched, timeout=15, interval=0.2)
    world.zone.remove(BACK, "TXT")
    with httpx.Client(base_url=ADMIN, trust_env=False, timeout=10) as admin:
        headers = {"Authorization": f"Bearer {world.account.access_token}"}
        reset = admin.post(
            f"/_synapse/admin/v1/federation/destinations/{BACK}/reset_connection",
            json={},
            headers=headers,
        )
        assert reset.status_code == 200, reset.text
        reset_at = time.monotonic()
        assert wait_until(
            lambda: verdict_state(linked, BACK) == "alive", timeout=15, interval=0.05
        )  # (the TXT verdict's TTL is 300 s)
        record(
            "t1 resume early",
            f"Synapse's backoff reset -> verdict alive in "
            f"{(time.monotonic() - reset_at) * 1000:.0f} ms (poll 0.5 s; TTL was 300 s)",
        )
        assert linked.metric("tombstone_resumed_early_total") == 1
        assert f"Synapse stopped backing off {BACK}" in linked.log()
        # Lifted while Synapse was not backing off: Synapse refuses the reset, honestly.
        assert wait_until(
            lambda: (
                linked.metric(
                    "tombstone_synapse_admin_requests_total",
                    op="reset_connection",
                    result="not_needed",
                )
                == 1
            ),
            timeout=10,
        )

        # Reset on lift: an operator verdict, Synapse backing off again, then the lift.
        ops(linked, "PUT", f"/v1/verdicts/{BACK}", b'{"comment": "e2e"}')
        make_synapse_back_off(world, client)  # the world's sidecar still holds BACK gone
        assert backing_off(world, BACK)
        lifted_at = time.monotonic()
        assert ops(linked, "DELETE", f"/v1/verdicts/{BACK}")["state"] == "alive"
        assert wait_until(lambda: not backing_off(world, BACK), timeout=10, interval=0.02)
        record(
            "t1 reset on lift",
            f"ops DELETE -> Synapse's destinations row cleared in "
            f"{(time.monotonic() - lifted_at) * 1000:.0f} ms",
        )
        # Synapse clears the row before its answer reaches the sidecar: wait for both.
        assert wait_until(
            lambda: (
                linked.metric(
                    "tombstone_synapse_admin_requests_total", op="reset_connection", result="ok"
                )
                == 1
            ),
            timeout=10,
        )
        assert f"{BACK} lifted: Synapse's backoff for it was reset" in linked.log()

        # The joined listing: our verdicts with Synapse's view of each name. A fresh room
        # shared with a dead server (a @bob of member-txt.test) ties Synapse to it.
        joined = join(client, world.live.add_shared_room("t1-ties"))
        assert joined.status == 200, joined
        sent = send_text(client, str(joined.body["room_id"]), "anyone there?")
        assert sent.status == 200, sent  # a transaction for every server in the room
        assert not linked.tunnel_opens(f"{TIED}:8448")  # gone here (TXT)
        ops(linked, "PUT", "/v1/verdicts/never-seen.test", b"{}")

        def rooms(name: str) -> int:
            path = f"/_synapse/admin/v1/federation/destinations/{name}/rooms"
            reply = admin.get(path, headers=headers)
            return int(reply.json()["total"]) if reply.status_code == 200 else 0

        assert wait_until(lambda: rooms(TIED) >= 1, timeout=15, interval=0.2)
        tied_rooms, back_rooms = rooms(TIED), rooms(BACK)
    argv = [
        *sidecar_command(),
        "verdicts",
        "list",
        "--synapse",
        "--ops-listen",
        f"127.0.0.1:{linked.ops_port}",
        "--synapse-admin-url",
        ADMIN,
        "--synapse-admin-token-file",
        str(token),
    ]
    listed = subprocess.run(
        [*argv, "--json"], capture_output=True, text=True, timeout=60, check=False
    )
    assert listed.returncode == 0, listed.stderr
    by_name = {v["destination"]: v for v in json.loads(listed.stdout)["verdicts"]}
    assert by_name[BACK]["synapse"]["retry_interval_ms"] == 0
    assert by_name[BACK]["synapse"]["rooms"] == back_rooms
    assert by_name[TIED]["state"] == "gone" and by_name[TIED]["synapse"]["rooms"] == tied_rooms
    assert by_name["never-seen.test"]["synapse"] is None  # Synapse never had a row for it
    table = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert table.returncode == 0, table.stderr
    assert "ROOMS" in table.stdout.splitlines()[0]
    record("t1 verdicts list --synapse", "\n" + table.stdout)
    assert any(line.startswith(BACK) and "sending" in line for line in table.stdout.splitlines())
    assert "WARNING" not in linked.log()


@pytest.mark.parametrize(
    ("url", "result"),
    [(ADMIN, "unauthorized"), ("http://127.0.0.1:9", "unreachable")],
    ids=["wrong-token", "admin-api-down"],
)
def test_a_broken_admin_link_is_one_warning_and_never_touches_proxying(
    world: World, tmp_path: Path, url: str, result: str
) -> None:
    token = tmp_path / "wrong-token"
    token.write_text("syt_bm90YWRtaW4_wrongwrongwrongwrong_000000\n")
    linked = world.start_sidecar(
        [
            "--synapse-admin-url",
            url,
            "--synapse-admin-token-file",
            str(token),
            "--synapse-admin-poll",
            "0.2s",
        ]
    )
    assert wait_until(
        lambda: (
            linked.metric(
                "tombstone_synapse_admin_requests_total", op="destinations", result=result
            )
            >= 3
        ),
        timeout=15,
    )
    warnings = [
        line
        for line in linked.log().splitlines()
        if "WARNING" in line and "Synapse admin API" in line
    ]
    assert len(warnings) == 1 and result in warnings[0], warnings
    assert linked.metric("tombstone_synapse_admin_up") == 0
    assert linked.tunnel_opens("live.test:8448")
    assert not linked.tunnel_opens("txt-gone.test:8448")
