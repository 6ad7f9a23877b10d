"""The proxy's listen backlog: a burst of connections while the sidecar is busy waits in the
kernel's accept queue instead of being dropped.

asyncio listens with a backlog of 100; a join of a big room opens ~1,000 CONNECTs within
seconds, and each SYN the kernel dropped cost Synapse a retransmit 1, 3, 7 s later. Here the
sidecar process is stopped (SIGSTOP: nothing is accepted), a burst of connections arrives,
and the kernel must complete every handshake; once the sidecar runs again it answers all."""

from __future__ import annotations

import errno
import select
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.proxy.shared_port import LISTEN_BACKLOG
from tests.support.procs import wait_until
from tests.support.sidecar_process import Sidecar, read_head

BURST = 400  # four times asyncio's default backlog, a tenth of ours


def _somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


@pytest.fixture
def burst() -> Iterator[list[socket.socket]]:
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


def _handshakes_done(sockets: list[socket.socket]) -> int:
    """Sockets whose TCP handshake completed (writable, no error), without reading."""
    poller = select.poll()
    for sock in sockets:
        poller.register(sock, select.POLLOUT)
    done = 0
    for fd, events in poller.poll(0):
        sock = socket.socket(fileno=fd)
        try:
            if events & select.POLLOUT and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                done += 1
        finally:
            sock.detach()
    return done


@pytest.mark.parametrize("shared_port", [False, True], ids=["own-port", "reuse-port"])
def test_a_burst_waits_in_the_accept_queue_while_the_sidecar_is_busy(
    sidecar_factory: Callable[..., Sidecar], burst: list[socket.socket], shared_port: bool
) -> None:
    if _somaxconn() < BURST + 1:
        pytest.skip(f"net.core.somaxconn {_somaxconn()} caps the backlog below {BURST}")
    assert LISTEN_BACKLOG >= BURST
    args = ["--deny", "gone.hs.test"] + (["--reuse-port"] if shared_port else [])
    sidecar = sidecar_factory(*args)
    proc = sidecar.process.proc
    assert proc is not None
    proc.send_signal(signal.SIGSTOP)
    try:
        for _ in range(BURST):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            assert sock.connect_ex(("127.0.0.1", sidecar.proxy_port)) in (0, errno.EINPROGRESS)
            burst.append(sock)
        # With asyncio's backlog the kernel completes ~101 and drops the rest's SYNs for as
        # long as nothing is accepted: this never holds, however long it waits.
        assert wait_until(lambda: _handshakes_done(burst) == BURST, timeout=10), (
            f"{_handshakes_done(burst)} of {BURST} handshakes completed, the sidecar stopped"
        )
    finally:
        proc.send_signal(signal.SIGCONT)

    request = b"CONNECT gone.hs.test:8448 HTTP/1.1\r\nHost: gone.hs.test:8448\r\n\r\n"
    statuses = []
    for sock in burst:
        sock.setblocking(True)
        sock.settimeout(30)
        sock.sendall(request)
        statuses.append(read_head(sock)[0])
    assert statuses == [502] * BURST
