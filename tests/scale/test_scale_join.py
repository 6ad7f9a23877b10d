"""Scenario 1 of issue 17 at CI size: Synapse joins a room of N servers through the hub and
sends a message. Asserts counts only (the join completes, every member is listed, every
live server receives the message); what reached the dead servers, timings and CPU go to
the measurements summary (`SIDECAR_TEST_SCALE_REPORT=path` writes them to a file)."""

from __future__ import annotations

import json
from collections.abc import Callable

from tests.scale.driver import join_and_send, report
from tests.scale.world import ScaleWorld


def test_join_then_every_live_server_receives_the_message(
    scale_world: ScaleWorld, record: Callable[[str, str], None]
) -> None:
    run = join_and_send(scale_world)
    figures = report(scale_world, run)
    label = f"scale {figures['mode']} N={figures['servers']}"
    for topic, value in figures.items():
        record(f"{label} {topic}", json.dumps(value, sort_keys=True))
    assert run.join_status == 200, run.join_body
    assert run.members == len(scale_world.population.servers) + 1
    assert run.message_status == 200
    assert run.message is not None
    missing = {s.name for s in scale_world.population.live} - set(run.message.arrivals)
    assert missing == set(), f"{len(missing)} live servers never received the message"
