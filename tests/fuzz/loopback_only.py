"""Run `tombstone-sidecar` with every outbound connection outside loopback refused.

The proxy fuzzers send arbitrary CONNECT targets and absolute URLs; a generated public IP
literal is a legitimate destination for the sidecar, so it would dial it. The fuzz tests
must never touch the network beyond loopback, so the sidecar they drive runs under this
guard: `socket.connect` and name resolution refuse anything but loopback with
ENETUNREACH (an ordinary connect failure the sidecar already handles), and say so in
the log.

    python -m tests.fuzz.loopback_only run --listen 127.0.0.1:3128 ...
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import sys
from typing import Any

GUARD_MARK = "loopback-only guard refused"

_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex
_getaddrinfo = socket.getaddrinfo


def _loopback(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _allowed(sock: socket.socket, address: Any) -> bool:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return True  # unix sockets (a redis:// unix store) are local by nature
    return isinstance(address, tuple) and _loopback(address[0])


def _refuse(what: object) -> OSError:
    print(f"{GUARD_MARK} {what!r}", file=sys.stderr, flush=True)
    return OSError(errno.ENETUNREACH, f"{GUARD_MARK} {what!r}")


def _guarded_connect(self: socket.socket, address: Any) -> None:
    if not _allowed(self, address):
        raise _refuse(address)
    _connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: Any) -> int:
    if not _allowed(self, address):
        _refuse(address)
        return errno.ENETUNREACH
    return _connect_ex(self, address)


def _guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
    if host is not None and not _loopback(host):
        raise socket.gaierror(socket.EAI_NONAME, f"{GUARD_MARK} resolving {host!r}")
    return _getaddrinfo(host, *args, **kwargs)


def install() -> None:
    socket.socket.connect = _guarded_connect  # type: ignore[assignment]
    socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[assignment]
    socket.getaddrinfo = _guarded_getaddrinfo


def main() -> int:
    install()
    from sidecar.cli.main import main as sidecar_main

    return sidecar_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
