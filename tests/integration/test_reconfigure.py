"""Options changed while the sidecar runs (mitmproxy `--set`, `Sidecar.reconfigure`): what
the sidecar believes survives. A new `--cache-size` once built a fresh policy, so every
verdict in memory (DNS tombstones, learned 410s, ops-API marks) was forgotten and the
names were dialled again until the next restart.

The real sidecar in this process (the reconfiguration is a method call under mitmproxy's
`configure` hook), with a real DNS server on loopback and a real SQLite store."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.app import Sidecar
from sidecar.config.options import Settings
from sidecar.judge.verdicts import State
from tests.integration.conftest import LIVE_IP
from tests.support.dns_server import DnsServer, Zone
from tests.support.procs import free_port


@pytest.fixture
def running(
    dns_server: DnsServer, tmp_path: Path
) -> Iterator[tuple[asyncio.AbstractEventLoop, Sidecar]]:
    settings = Settings.from_raw(
        {
            "listen": f"127.0.0.1:{free_port()}",
            "ops_listen": "",
            "nameserver": [f"127.0.0.1:{dns_server.port}"],
            "state_dir": str(tmp_path),
            "store": "sqlite",
            "probe": False,
            "cache_size": "100",
        }
    )
    loop = asyncio.new_event_loop()
    sidecar = Sidecar(settings)
    loop.run_until_complete(sidecar.start())
    try:
        yield loop, sidecar
    finally:
        loop.run_until_complete(sidecar.close())
        loop.close()


def _beliefs(
    loop: asyncio.AbstractEventLoop, sidecar: Sidecar, zone: Zone, unique: Callable[[str], str]
) -> dict[str, str]:
    """One name gone for each reason the sidecar can hold in memory, and live ones."""
    tombstoned, learned, marked = unique("txt-gone"), unique("learned-410"), unique("marked")
    zone.add(tombstoned, "TXT", "v=matrix;gone")
    zone.add(tombstoned, "A", LIVE_IP)
    live = [unique("live") for _ in range(5)]
    for name in [learned, marked, *live]:
        zone.add(name, "A", LIVE_IP)
    for name in [tombstoned, learned, *live]:
        loop.run_until_complete(sidecar.decide(name))
    sidecar.policy.learn_gone(learned, 3600.0, f"https://{learned}/_matrix/: 410")
    sidecar.mark_gone(marked, 3600.0, "decommissioned, per their admin")
    names = {tombstoned: "dns_txt_gone", learned: "http_410", marked: "operator"}
    names.update(dict.fromkeys(live, "alive"))
    return names


def _state(sidecar: Sidecar, name: str) -> str | None:
    entry = sidecar.verdict(name)
    if entry is None:
        return None
    verdict = entry.verdict
    return verdict.signal if verdict.state is State.GONE else verdict.state.value


@pytest.mark.parametrize("cache_size", [100_000, 100])
def test_a_new_cache_size_keeps_every_verdict(
    running: tuple[asyncio.AbstractEventLoop, Sidecar],
    zone: Zone,
    unique: Callable[[str], str],
    cache_size: int,
) -> None:
    loop, sidecar = running
    names = _beliefs(loop, sidecar, zone, unique)
    assert {name: _state(sidecar, name) for name in names} == names
    policy = sidecar.policy

    sidecar.reconfigure(dataclasses.replace(sidecar.settings, cache_size=cache_size + 1))

    assert sidecar.policy is policy
    assert {name: _state(sidecar, name) for name in names} == names
    for name in (n for n, why in names.items() if why == "alive"):  # dialled without DNS
        assert sidecar.address_book.fresh(name) is not None, name
    for name, why in names.items():
        entry = loop.run_until_complete(sidecar.decide(name))
        assert entry.verdict.suppresses == (why != "alive"), name


def test_a_smaller_cache_drops_live_names_before_gone_ones(
    running: tuple[asyncio.AbstractEventLoop, Sidecar],
    zone: Zone,
    unique: Callable[[str], str],
) -> None:
    loop, sidecar = running
    names = _beliefs(loop, sidecar, zone, unique)
    in_cache = [n for n, why in names.items() if why != "operator"]  # marks live beside it
    gone_in_cache = [n for n in in_cache if names[n] != "alive"]
    assert len(sidecar.policy.cache) == len(in_cache)

    sidecar.reconfigure(dataclasses.replace(sidecar.settings, cache_size=len(gone_in_cache) + 1))

    kept = {n for n in in_cache if n in sidecar.policy.cache}
    assert len(kept) == len(gone_in_cache) + 1
    assert set(gone_in_cache) <= kept
    assert all(_state(sidecar, n) == names[n] for n in names if n in kept or n not in in_cache)
