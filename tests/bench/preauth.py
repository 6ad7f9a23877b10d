"""Pre-authentication resource use on the proxy port of a real sidecar process.

    python -m tests.bench.preauth [--idle-limit SECONDS] [extra `run` options]

Starts `tombstone-sidecar run --proxy-auth-file ...` against the loopback test DNS server,
then (1) sends three unauthenticated requests whose one header line is 40 MB long, on three
connections held open, and prints the sidecar's VmRSS before, while they are open and after
they are closed; (2) opens one connection that sends nothing and prints how long the sidecar
keeps it open (up to --idle-limit).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import tempfile
import time
from pathlib import Path

from tests.support.dns_server import DnsServer
from tests.support.sidecar_process import Sidecar

LINE_BYTES = 40 * 1024 * 1024
CHUNK = b"a" * 65536


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def send_long_line(port: int) -> socket.socket:
    """An unauthenticated request whose header line never ends (40 MB of it)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"GET http://example.test/ HTTP/1.1\r\nHost: example.test\r\nX-Long: ")
    sent = 0
    with contextlib.suppress(OSError):  # closed by the sidecar: that is the point
        while sent < LINE_BYTES:
            sock.sendall(CHUNK)
            sent += len(CHUNK)
    print(f"  sent {sent / 2**20:.1f} MiB before the sidecar stopped reading or closed")
    return sock


def idle_lifetime(port: int, limit: float) -> float | None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.monotonic()
        sock.settimeout(limit)
        try:
            data = sock.recv(1)
        except TimeoutError:
            return None
        except OSError:
            data = b""
        assert data == b"", data
        return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle-limit", type=float, default=60.0)
    args, extra = parser.parse_known_args()
    with DnsServer() as dns, tempfile.TemporaryDirectory(prefix="preauth-") as scratch:
        users = Path(scratch) / "users"
        users.write_text("synapse:s3cret-pass\n")
        argv = ["--proxy-auth-file", str(users), "--store", "memory", "--no-probe", *extra]
        sidecar = Sidecar(dns.port, argv, log_dir=Path(scratch)).start()
        try:
            pid = sidecar.process.pid
            time.sleep(1)
            before = rss_kib(pid)
            print(f"VmRSS before: {before / 1024:.1f} MiB")
            socks = [send_long_line(sidecar.proxy_port) for _ in range(3)]
            time.sleep(2)
            during = rss_kib(pid)
            print(
                f"VmRSS with 3 x 40 MB header lines sent: {during / 1024:.1f} MiB "
                f"(+{(during - before) / 1024:.1f} MiB)"
            )
            for sock in socks:
                sock.close()
            time.sleep(2)
            after = rss_kib(pid)
            print(
                f"VmRSS after the connections closed: {after / 1024:.1f} MiB "
                f"(+{(after - before) / 1024:.1f} MiB)"
            )
            lived = idle_lifetime(sidecar.proxy_port, args.idle_limit)
            shown = f"{lived:.1f}s" if lived is not None else f"> {args.idle_limit:g}s (still open)"
            print(f"an idle connection was closed by the sidecar after {shown}")
            print(f"/healthz: {sidecar.ops('/healthz')[0]}")
        finally:
            sidecar.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
