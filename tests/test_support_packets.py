"""The packet counter of the e2e and scale worlds (tests/support/packets.py), on the real
loopback: SYNs to any address; with a watched network, when payload reached each address
in it (and only payload: a bare handshake or FIN is no data)."""

from __future__ import annotations

import os
import socket
import time

import pytest

from tests.support.packets import SynCounter
from tests.support.procs import wait_until

WATCHED = "127.77.0.0/16"  # nothing else on this machine's loopback uses it


@pytest.mark.skipif(os.geteuid() != 0, reason="AF_PACKET needs CAP_NET_RAW")
def test_syns_anywhere_and_payload_to_the_watched_network() -> None:
    counter = SynCounter(watch=WATCHED).start()
    listeners = [socket.create_server((ip, 0)) for ip in ("127.77.0.1", "127.78.0.1")]
    try:
        before = time.time()
        for listener in listeners:
            with socket.create_connection(listener.getsockname()) as client:
                served, _ = listener.accept()
                client.sendall(b"GET / HTTP/1.1\r\n\r\n")
                assert served.recv(100)
                served.close()
        with socket.create_connection(listeners[0].getsockname()):  # no data: no payload
            listener_side, _ = listeners[0].accept()
            listener_side.close()
        assert wait_until(lambda: counter.attempts("127.78.0.1") == 1)
        assert wait_until(lambda: counter.attempts("127.77.0.1") == 2)
        payload = counter.payload_times()
        assert list(payload) == ["127.77.0.1"]  # the other network is only counted by SYN
        assert len(payload["127.77.0.1"]) == 1  # one data segment: the request
        assert before <= payload["127.77.0.1"][0] <= time.time()
    finally:
        for listener in listeners:
            listener.close()
        counter.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="AF_PACKET needs CAP_NET_RAW")
def test_without_a_watched_network_only_syns_are_kept() -> None:
    counter = SynCounter().start()
    listener = socket.create_server(("127.77.0.1", 0))
    try:
        with socket.create_connection(listener.getsockname()) as client:
            served, _ = listener.accept()
            client.sendall(b"data")
            assert served.recv(10)
            served.close()
        assert wait_until(lambda: counter.attempts("127.77.0.1") == 1)
        assert counter.payload_times() == {}
    finally:
        listener.close()
        counter.stop()
