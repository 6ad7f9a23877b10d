"""TLS clients that behave as awkwardly as real ones may."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time

from tests.support.sidecar_process import read_head


def split_hello_get(sock: socket.socket, context: ssl.SSLContext, name: str) -> int:
    """A GET inside a CONNECT tunnel whose ClientHello goes out in two writes 0.2 s apart
    (so the proxy sees it incomplete first); the status, or 0 when the handshake or the
    answer never came. Closes `sock`."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        sock.sendall(hello[:16])
        time.sleep(0.2)
        sock.sendall(hello[16:])
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                data = sock.recv(65536)
                if not data:
                    return 0
                incoming.write(data)
        tls.write(f"GET / HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
        sock.sendall(outgoing.read())
        while True:  # session tickets may come first
            try:
                return int(tls.read(65536).split(b" ", 2)[1])
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                if not data:
                    return 0
                incoming.write(data)
    except (OSError, ssl.SSLError, ValueError, IndexError):
        return 0
    finally:
        sock.close()


def tls_get(sock: socket.socket, context: ssl.SSLContext, name: str) -> int:
    """A GET inside a CONNECT tunnel; its status, or 0 when the TLS handshake or the
    answer never came."""
    try:
        with context.wrap_socket(sock, server_hostname=name) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
            return read_head(tls)[0]
    except (OSError, ssl.SSLError):
        return 0
