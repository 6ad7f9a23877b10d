"""The sidecar killed under load (kill -9) and restarted: Synapse recovers, state is intact.

While a client keeps asking Synapse for a live user's profile (profile queries ignore
Synapse's backoff, so they show the proxy's availability directly), the sidecar is killed
with SIGKILL and started again on the same ports with the same state directory. Requests
during the gap fail (Synapse does not go direct when its proxy is down, docs/design.md §2);
afterwards they succeed again, the stored verdicts were loaded, and the dead servers still
receive nothing.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import httpx

from tests.e2e.actions import profile
from tests.e2e.world import TOMBSTONES, World
from tests.support.procs import wait_until

LIVE_USER = "@carol:live.test"


def test_sidecar_killed_under_load_and_restarted_synapse_recovers(
    world: World, client: httpx.Client, record: Callable[[str, str], None]
) -> None:
    sidecar, synapse, account = world.sidecar, world.synapse, world.account
    assert sidecar is not None and synapse is not None and account is not None
    assert sidecar.process.proc is not None
    dead_before = world.dead_connections()
    assert profile(client, TOMBSTONES[0].user).status == 502  # a gone verdict to persist
    assert profile(client, LIVE_USER).status == 200
    assert wait_until(lambda: (sidecar.state_dir / "verdicts.sqlite3").stat().st_size > 0)
    time.sleep(0.5)  # one write-behind flush (200 ms) with margin

    results: list[tuple[float, int]] = []
    stop = threading.Event()

    def keep_asking() -> None:
        with synapse.client(account, timeout=15) as own:
            while not stop.is_set():
                outcome = profile(own, LIVE_USER)
                results.append((time.monotonic(), outcome.status))

    load = threading.Thread(target=keep_asking)
    load.start()
    try:
        time.sleep(1.0)
        killed_at = time.monotonic()
        os.kill(sidecar.process.proc.pid, signal.SIGKILL)
        sidecar.process.proc.wait()
        time.sleep(1.0)
        sidecar.restart()
        restarted_at = time.monotonic()
        assert wait_until(
            lambda: any(t > restarted_at and s == 200 for t, s in results), timeout=20, interval=0.2
        )
        time.sleep(1.0)
    finally:
        stop.set()
        load.join(timeout=30)

    before = [s for t, s in results if t < killed_at]
    during = [s for t, s in results if killed_at <= t < restarted_at]
    after = [s for t, s in results if t >= restarted_at]
    recovered_in = min(t for t, s in results if t >= restarted_at and s == 200) - restarted_at
    record(
        "s6 kill -9 under load",
        f"before {len(before)} requests ({before.count(200)} ok), during the gap "
        f"{len(during)} ({during.count(200)} ok), after restart {len(after)} "
        f"({after.count(200)} ok); first success {recovered_in * 1000:.0f} ms after the "
        "restart",
    )
    assert before and set(before) == {200}
    assert after[-3:] == [200, 200, 200]
    assert "verdict(s) from" in sidecar.log() and "is unreadable" not in sidecar.log()
    assert profile(client, TOMBSTONES[0].user).status == 502
    assert world.new_dead_connections(dead_before) == {}
