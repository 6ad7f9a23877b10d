"""Scenarios 1 and 2 of issue 17 at CI size: Synapse joins a room of N servers through the
hub and sends a message, then more messages, a typing notification and a new device. The
tests assert counts only (the join completes, every member is listed, every live server
receives each); what reached the dead servers, timings and CPU go to the measurements
summary (`SIDECAR_TEST_SCALE_REPORT=path` writes them to a file). The two tests share one
world, in this order."""

from __future__ import annotations

import json
from collections.abc import Callable

from tests.scale.driver import fan_out, join_and_send, report
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


FAN_OUT_MESSAGES = 3


def test_fan_out_reaches_every_live_server(
    scale_world: ScaleWorld, record: Callable[[str, str], None]
) -> None:
    """Scenario 2 of issue 17 (after the join above): messages, a typing notification and a
    new device each reach every live server."""
    result = fan_out(scale_world, FAN_OUT_MESSAGES)
    label = f"scale {scale_world.mode} N={len(scale_world.population.servers)}"
    record(f"{label} fan_out", json.dumps(result.summary(), sort_keys=True))
    live = len(scale_world.population.live)
    assert [len(d.arrivals) for d in result.messages] == [live] * FAN_OUT_MESSAGES
    assert result.typing is not None and len(result.typing.arrivals) == live
    assert result.device is not None and len(result.device.arrivals) == live
