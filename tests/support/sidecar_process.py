"""Drive a real `tombstone-sidecar run` process: start it, talk through it (or to its ports
byte by byte), read its metrics, and spot a crash in its log."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import ManagedProcess, free_port, wait_for_port, wait_until

# What a crash inside the sidecar leaves in its log: a hook that raised (mitmproxy logs
# "Addon error"), an ops handler that raised ("Unhandled error in task"), any traceback.
CRASH_MARKS = ("Traceback (most recent call last)", "Addon error", "Unhandled error")


def sidecar_command() -> list[str]:
    """The installed console script next to this interpreter, as a user would run it."""
    script = Path(sys.executable).parent / "tombstone-sidecar"
    if script.exists():
        return [str(script)]
    found = shutil.which("tombstone-sidecar")
    return [found] if found else [sys.executable, "-m", "sidecar.cli"]


REPO = Path(__file__).resolve().parents[2]
ADDON_SCRIPT = REPO / "addons" / "tombstone.py"


def mitmdump_path() -> str:
    """mitmdump next to this interpreter (installed with mitmproxy), else on PATH."""
    mitmdump = Path(sys.executable).parent / "mitmdump"
    command = str(mitmdump) if mitmdump.exists() else shutil.which("mitmdump")
    assert command, "mitmdump is installed with mitmproxy"
    return command


def mitmdump_command(
    port: int, confdir: Path, options: Sequence[str], script: Path = ADDON_SCRIPT
) -> list[str]:
    """Stock mitmdump on loopback running `script` (the sidecar's addon by default), as the
    docs show it, with each of `options` (`name=value`) given as `--set`."""
    sets = [arg for option in options for arg in ("--set", option)]
    return [
        mitmdump_path(),
        "-q",
        "--listen-host",
        "127.0.0.1",
        "-p",
        str(port),
        "--set",
        f"confdir={confdir}",
        "-s",
        str(script),
        "--set",
        "connection_strategy=lazy",
        *sets,
    ]


@dataclass
class ConnectReply:
    """What the proxy answered to a CONNECT, and the socket if the tunnel is open."""

    status: int
    reason: str
    headers: dict[str, str]
    body: bytes
    sock: socket.socket | None = field(default=None, repr=False)

    def json(self) -> dict[str, object]:
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data


def read_head(sock: socket.socket) -> tuple[int, str, dict[str, str], bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    if not buf:
        return 0, "closed without an answer", {}, b""
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    _, status, reason = ([*lines[0].split(" ", 2), ""])[:3]
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return int(status), reason, headers, rest


class Sidecar:
    """One sidecar process on free loopback ports, asking the test DNS server."""

    def __init__(
        self,
        dns_port: int,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        proxy_port: int | None = None,
    ) -> None:
        self.proxy_port = proxy_port or free_port()
        self.ops_port = free_port()
        # Every sidecar gets its own state directory unless the test names one: a shared
        # default would carry verdicts from one test (or run) into the next.
        self.state_dir = Path(tempfile.mkdtemp(prefix="sidecar-state-", dir=log_dir))
        state = [] if "--state-dir" in args else ["--state-dir", str(self.state_dir)]
        argv = [
            *sidecar_command(),
            "run",
            "--listen",
            f"127.0.0.1:{self.proxy_port}",
            "--ops-listen",
            f"127.0.0.1:{self.ops_port}",
            "--nameserver",
            f"127.0.0.1:{dns_port}",
            "--dns-timeout",
            "2s",
            "--log-level",
            "debug",
            *state,
            *args,
        ]
        self._log_dir = log_dir
        self._env = env
        self.argv = argv
        self.restarts = 0
        self.process = ManagedProcess(argv, env=env, log_path=self._log_path())

    def _log_path(self) -> Path | None:
        if self._log_dir is None:
            return None
        return self._log_dir / f"sidecar-{self.proxy_port}-{self.restarts}.log"

    def restart(self) -> Sidecar:
        """Stop the process and start a new one with the same arguments, ports and state."""
        self.stop()
        self.restarts += 1
        self.process = ManagedProcess(self.argv, env=self._env, log_path=self._log_path())
        return self.start()

    def start(self) -> Sidecar:
        self.process.start()
        assert self.process.proc is not None
        wait_for_port(self.proxy_port, proc=self.process.proc, log_path=self.process.log_path)
        wait_for_port(self.ops_port, proc=self.process.proc, log_path=self.process.log_path)
        assert wait_until(lambda: self.ops("/readyz")[0] == 200, timeout=10), self.log()
        return self

    def stop(self) -> int | None:
        return self.process.stop()

    def log(self) -> str:
        return self.process.log_path.read_text(errors="replace")

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    # -- ops API -------------------------------------------------------------------------

    def ops(self, path: str) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.ops_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, body = self.ops("/metrics")
        assert status == 200, body
        samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return samples

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, frozenset(labels.items())), 0.0)

    # -- clients -------------------------------------------------------------------------

    def connect(self, target: str, timeout: float = 10.0) -> ConnectReply:
        """Send `CONNECT target` as Synapse does (no headers but Host) and read the answer."""
        sock = socket.create_connection(("127.0.0.1", self.proxy_port), timeout=timeout)
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        status, reason, headers, rest = read_head(sock)
        if status == 200:
            return ConnectReply(status, reason, headers, rest, sock)
        body = rest
        length = int(headers.get("content-length", "-1"))
        while length < 0 or len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        sock.close()
        return ConnectReply(status, reason, headers, body)

    def tunnel_opens(self, target: str) -> bool:
        """True when `CONNECT target` is answered 200 (the tunnel is closed again at once)."""
        reply = self.connect(target)
        if reply.sock is not None:
            reply.sock.close()
        return reply.status == 200

    def https_get(
        self,
        target: str,
        sni: str,
        context: ssl.SSLContext,
        path: str = "/",
        body: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """A GET (or POST with `body`) over a tunnel to `target` with TLS SNI `sni`."""
        reply = self.connect(target)
        assert reply.status == 200 and reply.sock is not None, reply
        with context.wrap_socket(reply.sock, server_hostname=sni) as tls:
            method = "POST" if body is not None else "GET"
            payload = body or b""
            tls.sendall(
                f"{method} {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            status, _, headers, rest = read_head(tls)
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                rest += chunk
        return status, headers, rest


def exchange(
    port: int,
    data: bytes,
    *,
    half_close: bool,
    timeout: float,
) -> tuple[bytes, bool, float]:
    """Send `data` on a fresh loopback connection and read until the peer closes.

    Returns (everything received, whether the peer closed or reset, seconds taken). With
    `half_close` our write side is shut right after sending: the peer sees end of input.
    Stops reading at `timeout` (then `closed` is False: the peer hung).
    """
    started = time.monotonic()
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # the peer may close before taking everything: that is an answer
            pass
        deadline = started + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return received, False, time.monotonic() - started
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return received, False, time.monotonic() - started
            except OSError:  # reset by peer
                return received, True, time.monotonic() - started
            if not chunk:
                return received, True, time.monotonic() - started
            received += chunk
            if len(received) > 1 << 20:
                raise AssertionError(f"more than 1 MiB in answer to {data[:200]!r}")
