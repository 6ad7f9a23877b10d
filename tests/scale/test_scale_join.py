"""Scenarios 1 and 2 of issue 17 at CI size: Synapse joins a room of N servers through the
hub and sends a message, then more messages, a typing notification and a new device; then
issue 17's dead-server goal, per name. The tests assert counts only (the join completes,
every member is listed, every live server receives each; what reached each dead name, and
when against the sidecar's verdicts); timings and CPU go to the measurements summary
(`SIDECAR_TEST_SCALE_REPORT=path` writes them to a file). The tests share one world, in
this order."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.scale.accounting import DeadAccount
from tests.scale.driver import fan_out, join_and_send, report
from tests.scale.population import DNS_SIGNAL_KINDS
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


def _dead_account(scale_world: ScaleWorld, record: Callable[[str, str], None]) -> DeadAccount:
    account = scale_world.dead_account()
    if account.verdicts is None:
        pytest.skip(f"{scale_world.mode}: no sidecar, no verdicts to count against")
    label = f"scale {scale_world.mode} N={len(scale_world.population.servers)}"
    record(f"{label} dead servers per kind", json.dumps(account.summary(), sort_keys=True))
    return account


def test_dns_signal_kinds_are_never_reached(
    scale_world: ScaleWorld, record: Callable[[str, str], None]
) -> None:
    """Issue 17's dead-server goal (after the join and the fan-out above): a name DNS says is
    gone (NXDOMAIN, TXT tombstone, SRV ".") gets no SYN and no request at all."""
    account = _dead_account(scale_world, record)
    kinds = account.by_kind()
    reached = {
        kind: (kinds[kind].syns, kinds[kind].requests, kinds[kind].never_judged_gone)
        for kind in DNS_SIGNAL_KINDS
    }
    assert reached == {kind: (0, 0, 0) for kind in DNS_SIGNAL_KINDS}, account.summary()


def test_no_connection_attempt_after_the_first_gone_verdict(
    scale_world: ScaleWorld, record: Callable[[str, str], None]
) -> None:
    """No dead server of any kind gets a SYN after the sidecar's first gone (or unreachable)
    verdict on its name."""
    account = _dead_account(scale_world, record)
    late = {k: c.syns_after_verdict for k, c in account.by_kind().items() if c.syns_after_verdict}
    assert late == {}, json.dumps(account.timelines(names=account.late_names()), indent=1)


def test_no_request_after_the_first_gone_verdict(
    scale_world: ScaleWorld, record: Callable[[str, str], None]
) -> None:
    """No dead server of any kind gets a request after the sidecar's first gone verdict on
    its name."""
    account = _dead_account(scale_world, record)
    late = {
        k: c.requests_after_verdict
        for k, c in account.by_kind().items()
        if c.requests_after_verdict
    }
    assert late == {}, json.dumps(account.timelines(names=account.late_names()), indent=1)
