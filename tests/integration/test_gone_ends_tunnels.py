"""A verdict ends what is already open: pass-through tunnels to a name judged gone close.

Synapse pools idle federation connections for two minutes. A tunnel it opened while a
server was still judged alive would otherwise carry its next request to the server after
the sidecar learned it is gone (tests/scale at 300 servers: 16 requests reached 410 servers
60-65 s after their verdict). Driven through the real sidecar process with a real TLS
client on keep-alive tunnels: an operator's mark (ops API) and a deny-list reload each end
the gone name's tunnels and no other; shadow mode ends nothing.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.conftest import LIVE_IP
from tests.support.dns_server import Zone
from tests.support.procs import wait_until
from tests.support.sidecar_process import Sidecar, exchange, read_head
from tests.support.tls_upstream import TestCA, Upstream

TOKEN = "tunnels-ops-token-0123456789abcdef"
ENDED_WITHIN = 5.0  # seconds: the verdict is applied at once, this is only a ceiling


@contextmanager
def keep_alive_tunnel(
    sidecar: Sidecar, name: str, port: int, context: ssl.SSLContext
) -> Iterator[ssl.SSLSocket]:
    """A tunnel through the sidecar with one keep-alive request answered on it."""
    reply = sidecar.connect(f"{name}:{port}")
    assert reply.status == 200 and reply.sock is not None, reply
    with context.wrap_socket(reply.sock, server_hostname=name) as tls:
        assert get(tls, name) == 200
        yield tls


def get(tls: ssl.SSLSocket, name: str) -> int:
    """One keep-alive GET on the tunnel; its status (the body is read whole)."""
    tls.sendall(f"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
    status, _, headers, rest = read_head(tls)
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = tls.recv(65536)
        assert chunk, "the tunnel closed inside an answer"
        rest += chunk
    return status


def ended(tls: ssl.SSLSocket) -> bool:
    """True when the sidecar closed the tunnel (EOF or reset) within ENDED_WITHIN."""
    tls.settimeout(ENDED_WITHIN)
    try:
        return tls.recv(1) == b""
    except (ConnectionError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


def mark_gone(sidecar: Sidecar, name: str) -> None:
    body = json.dumps({"comment": "retired"}).encode()
    request = (
        f"PUT /v1/verdicts/{name} HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    received, _, _ = exchange(sidecar.ops_port, request, half_close=True, timeout=5.0)
    assert received.startswith(b"HTTP/1.1 200"), received[:300]


@pytest.fixture
def token(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def test_a_mark_ends_the_gone_names_tunnels_and_no_other(
    sidecar_factory: Callable[..., Sidecar],
    token: Path,
    zone: Zone,
    ca: TestCA,
    live_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    gone, other = unique("retiring"), unique("staying")
    zone.add(gone, "A", LIVE_IP)
    zone.add(other, "A", LIVE_IP)
    sidecar = sidecar_factory("--ops-token-file", str(token))
    context = ca.client_context()
    port = live_upstream.port
    with (
        keep_alive_tunnel(sidecar, gone, port, context) as first,
        keep_alive_tunnel(sidecar, gone, port, context) as second,
        keep_alive_tunnel(sidecar, other, port, context) as staying,
    ):
        mark_gone(sidecar, gone)
        assert ended(first) and ended(second), sidecar.log()[-3000:]
        assert get(staying, other) == 200  # the other name's tunnel still carries requests
        assert sidecar.metric("tombstone_tunnels_ended_total") == 2
    assert not sidecar.tunnel_opens(f"{gone}:{port}")  # and no new one opens


def test_a_deny_list_reload_ends_the_tunnels_of_the_names_it_adds(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    ca: TestCA,
    live_upstream: Upstream,
    unique: Callable[[str], str],
    tmp_path: Path,
) -> None:
    gone = unique("denied-later")
    zone.add(gone, "A", LIVE_IP)
    deny = tmp_path / "deny.txt"
    deny.write_text("")
    sidecar = sidecar_factory("--deny-file", str(deny))
    with keep_alive_tunnel(sidecar, gone, live_upstream.port, ca.client_context()) as tunnel:
        replacement = tmp_path / "deny.new"
        replacement.write_text(f"{gone}\n")
        os.replace(replacement, deny)
        assert sidecar.process.proc is not None
        sidecar.process.proc.send_signal(1)  # SIGHUP: reload the lists now
        assert ended(tunnel), sidecar.log()[-3000:]
    assert wait_until(lambda: sidecar.metric("tombstone_tunnels_ended_total") == 1, timeout=5)


def test_shadow_mode_ends_nothing(
    sidecar_factory: Callable[..., Sidecar],
    token: Path,
    zone: Zone,
    ca: TestCA,
    live_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    name = unique("shadowed")
    zone.add(name, "A", LIVE_IP)
    sidecar = sidecar_factory("--ops-token-file", str(token), "--no-enforce")
    with keep_alive_tunnel(sidecar, name, live_upstream.port, ca.client_context()) as tunnel:
        mark_gone(sidecar, name)
        assert get(tunnel, name) == 200  # still open, still forwarded
    assert sidecar.metric("tombstone_tunnels_ended_total") == 0
