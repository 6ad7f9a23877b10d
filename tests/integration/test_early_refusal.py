"""A CONNECT to a cached gone name, refused at the first bytes (admission.py,
`TunnelGate.refuse_early`): the same close, counters and log as the refusal at
`http_connect`, with proxy authentication still first and anything unusual left to
mitmproxy's HTTP layer.

The sidecar processes are real; one test runs Admission and the addon in process inside
mitmproxy's addon test context, to show which layer a head gets (the only difference the
early refusal makes is the work it skips).
"""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.integration.conftest import DEAD_IP, LIVE_IP
from tests.support.dns_server import Zone
from tests.support.procs import closed_within
from tests.support.sidecar_process import Sidecar, read_head
from tests.support.tls_upstream import Upstream

REPEATS = 20
USER, PASSWORD = "synapse", "s3cret-pass"
CREDENTIALS = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
WRONG = "Basic " + base64.b64encode(f"{USER}:not-it".encode()).decode()


def gone_name(zone: Zone, name: str) -> str:
    zone.add(name, "A", DEAD_IP)
    zone.add(name, "TXT", "v=matrix;gone")
    return name


def raw_connect(sidecar: Sidecar, *writes: bytes) -> tuple[bool, bytes]:
    """Send `writes` one after another (a pause between them), then read until the sidecar
    closes: (closed within 5 s, what arrived)."""
    with socket.create_connection(("127.0.0.1", sidecar.proxy_port), timeout=10) as sock:
        for index, data in enumerate(writes):
            if index:
                time.sleep(0.1)  # its own read: mitmproxy sees the head in two pieces
            sock.sendall(data)
        return closed_within(sock, 5.0)


def head(target: str, *lines: str) -> bytes:
    return "\r\n".join([f"CONNECT {target} HTTP/1.1", f"Host: {target}", *lines, "", ""]).encode()


def test_cached_gone_connects_are_closed_counted_and_logged_once(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    dead_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    sidecar = sidecar_factory("--refusal", "close", "--log-level", "info")
    name = gone_name(zone, unique("early"))
    target = f"{name}:{dead_upstream.port}"
    assert raw_connect(sidecar, head(target)) == (True, b"")  # cold: judged at http_connect
    for _ in range(REPEATS):  # cached: refused at the first bytes
        assert raw_connect(sidecar, head(target)) == (True, b"")
    total = REPEATS + 1
    assert sidecar.metric("tombstone_suppressed_total", signal="dns_txt_gone", stage="connect") == (
        total
    )
    decisions = sidecar.metric("tombstone_decision_seconds_count", stage="connect")
    assert decisions == total
    assert dead_upstream.connections == 0
    verdict_lines = [line for line in sidecar.log().splitlines() if name in line]
    assert len(verdict_lines) == 1, verdict_lines  # one line per verdict change, not per refusal


def test_a_head_in_two_writes_or_a_live_name_takes_the_http_layer(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    dead_upstream: Upstream,
    live_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    sidecar = sidecar_factory("--refusal", "close")
    name = gone_name(zone, unique("split"))
    target = f"{name}:{dead_upstream.port}"
    assert raw_connect(sidecar, head(target)) == (True, b"")  # now cached
    whole = head(target)
    assert raw_connect(sidecar, whole[:20], whole[20:]) == (True, b"")  # refused all the same
    stage = {"signal": "dns_txt_gone", "stage": "connect"}
    assert sidecar.metric("tombstone_suppressed_total", **stage) == 2
    live = unique("live")
    zone.add(live, "A", LIVE_IP)
    for _ in range(2):  # cold, then cached: both open a tunnel
        assert sidecar.tunnel_opens(f"{live}:{live_upstream.port}")
    assert dead_upstream.connections == 0


def test_proxy_authentication_comes_before_the_early_refusal(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    dead_upstream: Upstream,
    unique: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """Without the right credentials a client learns nothing of a verdict: 407, as for
    any other target; with them, the refusal."""
    users = tmp_path / "users"
    users.write_text(f"{USER}:{PASSWORD}\n")
    sidecar = sidecar_factory("--refusal", "close", "--proxy-auth-file", str(users))
    name = gone_name(zone, unique("authearly"))
    target = f"{name}:{dead_upstream.port}"
    right = f"Proxy-Authorization: {CREDENTIALS}"
    assert raw_connect(sidecar, head(target, right)) == (True, b"")  # cold, then cached
    for lines in ((), (f"Proxy-Authorization: {WRONG}",), (right, right)):
        with socket.create_connection(("127.0.0.1", sidecar.proxy_port), timeout=10) as sock:
            sock.sendall(head(target, *lines))
            status, _, headers, _ = read_head(sock)
        assert status == 407, lines
        assert "proxy-authenticate" in headers
    assert sidecar.metric("tombstone_proxy_auth_failures_total") == 3
    for _ in range(3):
        assert raw_connect(sidecar, head(target, right)) == (True, b"")
    assert sidecar.metric("tombstone_suppressed_total", signal="dns_txt_gone", stage="connect") == 4
    assert dead_upstream.connections == 0


def test_the_proxy_mode_layer_closes_a_refused_connect_before_any_hook(tmp_path: Path) -> None:
    """In process: `run`'s own top layer (FirstBytesProxy) shows the first bytes to
    Admission; a refused CONNECT is closed with no hook asked, anything else goes on to
    mitmproxy's layer decision (its next_layer hook); an error closes (fail closed)."""
    asyncio.run(_top_layer(tmp_path))


async def _top_layer(tmp_path: Path) -> None:
    from mitmproxy.addons.next_layer import NextLayer as MitmNextLayer
    from mitmproxy.proxy import commands, events
    from mitmproxy.proxy.context import Context
    from mitmproxy.proxy.layer import NextLayerHook
    from mitmproxy.test import taddons, tflow

    from sidecar.proxy.addon import TombstoneAddon
    from sidecar.proxy.admission import Admission
    from sidecar.proxy.shared_port import FirstBytesProxy

    addon = TombstoneAddon()
    admission = Admission(addon.metrics, refuse_early=addon.refuse_early)

    def commands_for(data: bytes) -> tuple[Any, list[commands.Command]]:
        client = tflow.tclient_conn()
        client.proxy_mode = _regular_mode()
        top = FirstBytesProxy(Context(client, tctx.options), admission)
        out = list(top.handle_event(events.Start()))
        out += list(top.handle_event(events.DataReceived(client, data)))
        out += list(top.handle_event(events.ConnectionClosed(client)))
        return client, out

    with taddons.context(MitmNextLayer(), admission, addon) as tctx:
        tctx.configure(addon, **_OPTIONS)
        tctx.configure(admission, listen_host="127.0.0.1")
        await addon.running()
        try:
            client, out = commands_for(head("gone.test:8448"))
            assert [type(c) for c in out] == [commands.CloseConnection]
            assert isinstance(out[0], commands.CloseConnection) and out[0].connection is client
            _, out = commands_for(head("live.test:8448"))
            assert [type(c) for c in out][:1] == [NextLayerHook]
            _, out = commands_for(b"\x16\x03\x01\x00")  # TLS: mitmproxy's decision
            assert [type(c) for c in out][:1] == [NextLayerHook]

            def broken(host: str, port: int) -> bool:
                raise RuntimeError("injected")

            admission.refuse_early = broken
            _, out = commands_for(head("live.test:8448"))
            assert [type(c) for c in out] == [commands.CloseConnection]
        finally:
            await addon.done()
    registry = addon.metrics.registry
    assert (
        registry.get_sample_value(
            "tombstone_suppressed_total", {"signal": "operator", "stage": "connect"}
        )
        == 1
    )
    assert registry.get_sample_value("tombstone_admission_refused_total", {"reason": "error"}) == 1


def _regular_mode() -> Any:
    from mitmproxy.proxy.mode_specs import ProxyMode

    return ProxyMode.parse("regular")


_OPTIONS: dict[str, Any] = {
    "tombstone_deny": ["gone.test"],
    "tombstone_ops_listen": "",
    "tombstone_store": "memory",
    "tombstone_nameserver": ["127.0.0.1:9"],  # never asked: nothing here is cold
    "tombstone_refusal": "close",
    "tombstone_probe": False,
}


def test_the_layer_each_head_gets(tmp_path: Path) -> None:
    """In process: a plain, whole CONNECT head to a cached gone name gets the closing layer
    at once; a live name, a partial head, shadow mode, `--refusal status` and wrong
    credentials get the HTTP layer (and their usual answer from it)."""
    asyncio.run(_layers(tmp_path))


async def _layers(tmp_path: Path) -> None:
    from mitmproxy.addons.next_layer import NextLayer as MitmNextLayer
    from mitmproxy.proxy import events
    from mitmproxy.proxy.context import Context
    from mitmproxy.proxy.layer import NextLayer
    from mitmproxy.proxy.layers.modes import HttpProxy
    from mitmproxy.test import taddons, tflow

    from sidecar.proxy.addon import TombstoneAddon
    from sidecar.proxy.admission import Admission, HeadLimitedHttpLayer
    from sidecar.proxy.empty_connect import CloseClient

    users = tmp_path / "users"
    users.write_text(f"{USER}:{PASSWORD}\n")
    addon = TombstoneAddon()
    admission = Admission(addon.metrics, refuse_early=addon.refuse_early)

    def layer_for(*data: bytes, mitmdump: bool = False) -> object:
        """The layer chosen for a client whose first bytes are `data`: mitmproxy's choice
        first, then Admission's (`run`), or the other way round (`mitmdump -s`)."""
        context = Context(tflow.tclient_conn(), tctx.options)
        HttpProxy(context)
        nextlayer = NextLayer(context)
        for chunk in data:
            nextlayer.events.append(events.DataReceived(context.client, chunk))
        hooks = [tctx.master.addons.get("nextlayer").next_layer, admission.next_layer]
        for hook in reversed(hooks) if mitmdump else hooks:
            hook(nextlayer)
        return nextlayer.layer

    def suppressed() -> float:
        value = addon.metrics.registry.get_sample_value(
            "tombstone_suppressed_total", {"signal": "operator", "stage": "connect"}
        )
        return value or 0.0

    gone = head("gone.test:8448")
    with taddons.context(MitmNextLayer(), admission, addon) as tctx:
        tctx.configure(addon, **_OPTIONS)
        tctx.configure(admission, listen_host="127.0.0.1")
        await addon.running()
        try:
            assert isinstance(layer_for(gone), CloseClient)
            assert isinstance(layer_for(head("GONE.test.:443")), CloseClient)
            assert suppressed() == 2
            for other in (
                head("live.test:8448"),  # not cached: decided at http_connect (DNS)
                gone[:-2],  # the blank line has not arrived yet
                gone.replace(b"\r\n", b"\n"),  # bare LF: mitmproxy's parser judges it
                gone.replace(b"HTTP/1.1", b"HTTP/2"),
                head("gone.test:0"),
                head("gone.test:8448", "Bad Header"),
            ):
                assert isinstance(layer_for(other), HeadLimitedHttpLayer), other
            assert isinstance(layer_for(gone[:20], gone[20:]), CloseClient)  # one buffer
            assert isinstance(layer_for(gone, mitmdump=True), CloseClient)
            assert suppressed() == 4
            assert not isinstance(layer_for(head("live.test:1"), mitmdump=True), CloseClient)
            tctx.configure(addon, tombstone_refusal="status")
            assert isinstance(layer_for(gone), HeadLimitedHttpLayer)
            tctx.configure(addon, tombstone_refusal="close", tombstone_enforce=False)
            assert isinstance(layer_for(gone), HeadLimitedHttpLayer)
            tctx.configure(addon, tombstone_enforce=True)
            tctx.configure(addon, tombstone_proxy_auth_file=str(users))
            assert isinstance(layer_for(gone), HeadLimitedHttpLayer)  # 407 from the HTTP layer
            wrong = head("gone.test:8448", f"Proxy-Authorization: {WRONG}")
            assert isinstance(layer_for(wrong), HeadLimitedHttpLayer)
            right = head("gone.test:8448", f"Proxy-Authorization: {CREDENTIALS}")
            assert isinstance(layer_for(right), CloseClient)
            assert suppressed() == 5
        finally:
            await addon.done()
