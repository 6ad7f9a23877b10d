"""Real loopback upstream servers (TLS or plain) for proxy tests.

The sidecar's job is to forward or refuse connections, so tests need
upstreams whose connection/handshake/request counters are exact: a mock
cannot prove that a refused destination was never dialled.  Everything here
is plain threads + blocking sockets (no asyncio) so it cannot interfere with
the event loop of the code under test.
"""

from __future__ import annotations

import contextlib
import http
import select
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trustme

_MAX_HEADER_BYTES = 64 * 1024
DEFAULT_BODY = b'{"server":{"name":"fake","version":"0"}}'


class TestCA:
    """A throwaway CA (trustme) whose PEM lives in a temp dir.

    Subprocesses under test (the sidecar) need the CA as a *file*, in-process
    clients need an ``ssl.SSLContext``; this class provides both.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, directory: str | Path | None = None) -> None:
        self.ca = trustme.CA()
        self._owns_dir = directory is None
        self.directory = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="testca-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca_pem_path = self.directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem_path))

    @property
    def ca_pem(self) -> bytes:
        """The CA certificate in PEM form."""
        return self.ca.cert_pem.bytes()

    def issue_cert(self, names: list[str]) -> trustme.LeafCert:
        """A leaf certificate for ``names`` (DNS names or IP literals)."""
        return self.ca.issue_cert(*names)

    def issue(self, names: list[str]) -> ssl.SSLContext:
        """Server-side SSLContext presenting a leaf cert for ``names``."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.issue_cert(names).configure_cert(ctx)
        return ctx

    def write_leaf(self, names: list[str], stem: str = "leaf") -> tuple[Path, Path]:
        """Write (chain_pem_path, key_pem_path) for tools that want files."""
        leaf = self.issue_cert(names)
        chain = self.directory / f"{stem}.pem"
        key = self.directory / f"{stem}.key"
        chain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        return chain, key

    def write_mitmproxy_ca(self, confdir: str | Path) -> Path:
        """Write ``mitmproxy-ca.pem`` (key + cert) so mitmproxy signs with this CA."""
        target = Path(confdir)
        target.mkdir(parents=True, exist_ok=True)
        path = target / "mitmproxy-ca.pem"
        path.write_bytes(self.ca.private_key_pem.bytes() + self.ca.cert_pem.bytes())
        return path

    def client_context(self) -> ssl.SSLContext:
        """Client SSLContext that trusts only this CA."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(ctx)
        return ctx

    def cleanup(self) -> None:
        """Delete the temp dir if this object created it."""
        if self._owns_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> TestCA:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()


@dataclass(frozen=True)
class Request:
    """One HTTP request as the upstream saw it (after TLS termination)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    sni: str | None
    http_version: str = "HTTP/1.1"
    connection_id: int = 0


@dataclass
class Response:
    """What a handler wants sent back.

    ``close`` closes the connection after replying; ``abort`` closes it
    without sending anything (to simulate a crashing upstream).
    """

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False
    abort: bool = False


Handler = Callable[[Request], Response]


class _HttpError(Exception):
    """Malformed request: answer 400 and close."""


class _Listener:
    """Shared accept-loop machinery: wakeable select, tracked threads."""

    def __init__(self, host: str, port: int, backlog: int = 128) -> None:
        self.host = host
        self._requested_port = port
        self._backlog = backlog
        self._sock: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._accept_thread: threading.Thread | None = None
        self._conn_threads: set[threading.Thread] = set()
        self._conns: set[socket.socket] = set()
        self._port: int | None = None
        self._seq = 0

    @property
    def port(self) -> int:
        """Listening port (only valid while running)."""
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} is not running")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to connect to."""
        return (self.host, self.port)

    def _open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self._requested_port))
            sock.listen(self._backlog)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._port = sock.getsockname()[1]
        self._stop.clear()
        self._wake_r, self._wake_w = socket.socketpair()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"{type(self).__name__}-{self._port}", daemon=True
        )
        self._accept_thread.start()

    def _close(self) -> None:
        if self._port is None:
            return
        self._stop.set()
        assert self._wake_w is not None
        self._wake_w.send(b"x")
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        with self._lock:
            conns = list(self._conns)
            threads = list(self._conn_threads)
        for conn in conns:
            # Base-class shutdown: unblocks readers without touching SSL state.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=5)
        for conn in conns:
            conn.close()
        for sock in (self._sock, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._sock = self._wake_r = self._wake_w = None
        self._accept_thread = None
        self._port = None

    def _accept_loop(self) -> None:
        assert self._sock is not None and self._wake_r is not None
        listener = self._sock
        while not self._stop.is_set():
            ready, _, _ = select.select([listener, self._wake_r], [], [])
            if listener not in ready:
                continue
            try:
                conn, peer = listener.accept()
            except OSError:
                continue
            self._on_accept(conn)
            self._seq += 1
            thread = threading.Thread(
                target=self._run_conn, args=(conn, peer, self._seq), name="conn", daemon=True
            )
            with self._lock:
                self._conns.add(conn)
                self._conn_threads.add(thread)
            thread.start()

    def _run_conn(self, conn: socket.socket, peer: tuple[str, int], seq: int) -> None:
        try:
            self._serve(conn, peer, seq)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._conn_threads.discard(threading.current_thread())
            conn.close()

    def _track(self, conn: socket.socket) -> None:
        """Register a replacement socket object (e.g. after TLS wrap)."""
        with self._lock:
            self._conns.add(conn)

    def _untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _on_accept(self, conn: socket.socket) -> None:
        """Hook: called in the accept thread for every new connection."""

    def _serve(self, conn: socket.socket, peer: tuple[str, int], seq: int) -> None:
        """Hook: handle connection number ``seq`` until it is done."""


class Upstream(_Listener):
    """HTTP/1.1 (keep-alive) server over TLS or plain TCP, with counters.

    ``connections`` counts TCP accepts (before TLS), ``tls_handshakes``
    successful handshakes, ``tls_failures`` failed ones; ``requests`` keeps
    every parsed request with the SNI of its connection.
    """

    def __init__(
        self,
        ca: TestCA | None = None,
        names: list[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        handler: Handler | None = None,
        *,
        status: int = 200,
        body: bytes = DEFAULT_BODY,
        headers: dict[str, str] | None = None,
        tls: bool = True,
    ) -> None:
        super().__init__(host, port)
        self.tls = tls
        self.names = list(names) if names else ["localhost", host]
        self.status = status
        self.body = body
        self.extra_headers = dict(headers or {})
        self.handler: Handler = handler if handler is not None else self._default_handler
        self._ssl_ctx: ssl.SSLContext | None = None
        if tls:
            if ca is None:
                raise ValueError("tls=True needs a TestCA")
            self._ssl_ctx = ca.issue(self.names)
            self._ssl_ctx.set_alpn_protocols(["http/1.1"])
            self._ssl_ctx.sni_callback = self._on_sni
        self._sni_by_sock: dict[int, str | None] = {}
        self._connections = 0
        self._handshakes = 0
        self._tls_failures = 0
        self._requests: list[Request] = []
        self._snis: list[str | None] = []
        self._errors: list[str] = []

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> Upstream:
        """Bind and start accepting in a background thread."""
        self._open()
        return self

    def stop(self) -> None:
        """Close the listener and every open connection; join threads."""
        self._close()

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- counters ------------------------------------------------------------

    @property
    def connections(self) -> int:
        """TCP connections accepted (counted before any TLS)."""
        with self._lock:
            return self._connections

    @property
    def tls_handshakes(self) -> int:
        """Completed server-side TLS handshakes."""
        with self._lock:
            return self._handshakes

    @property
    def tls_failures(self) -> int:
        """TLS handshakes that failed (bad cert on the client side, garbage...)."""
        with self._lock:
            return self._tls_failures

    @property
    def requests(self) -> list[Request]:
        """Snapshot of every request received, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def snis(self) -> list[str | None]:
        """SNI of each completed handshake, in order (None = no SNI sent)."""
        with self._lock:
            return list(self._snis)

    @property
    def errors(self) -> list[str]:
        """Tracebacks of handler exceptions (answered as 500)."""
        with self._lock:
            return list(self._errors)

    def reset(self) -> None:
        """Zero all counters and forget recorded requests."""
        with self._lock:
            self._connections = 0
            self._handshakes = 0
            self._tls_failures = 0
            self._requests.clear()
            self._snis.clear()
            self._errors.clear()

    # -- serving -------------------------------------------------------------

    def _default_handler(self, request: Request) -> Response:
        headers = {"Content-Type": "application/json", **self.extra_headers}
        return Response(status=self.status, body=self.body, headers=headers)

    def _on_sni(
        self, sock: ssl.SSLSocket | ssl.SSLObject, name: str | None, ctx: ssl.SSLContext
    ) -> None:
        with self._lock:
            self._sni_by_sock[id(sock)] = name

    def _on_accept(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections += 1

    def _serve(self, conn: socket.socket, peer: tuple[str, int], seq: int) -> None:
        sni: str | None = None
        stream: socket.socket = conn
        if self._ssl_ctx is not None:
            tls = self._ssl_ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            self._track(tls)
            self._untrack(conn)
            stream = tls
            try:
                tls.do_handshake()
            except (ssl.SSLError, OSError):
                with self._lock:
                    self._tls_failures += 1
                    self._sni_by_sock.pop(id(tls), None)
                self._untrack(tls)
                tls.close()
                return
            with self._lock:
                self._handshakes += 1
                sni = self._sni_by_sock.pop(id(tls), None)
                self._snis.append(sni)
        try:
            self._http_loop(stream, sni, seq)
        finally:
            self._untrack(stream)
            with contextlib.suppress(OSError):
                stream.close()

    def _http_loop(self, stream: socket.socket, sni: str | None, conn_id: int) -> None:
        reader = _Reader(stream)
        while not self._stop.is_set():
            try:
                request = reader.read_request(sni, conn_id)
            except _HttpError as exc:
                self._send(stream, Response(400, str(exc).encode(), close=True), "GET")
                return
            if request is None:
                return
            with self._lock:
                self._requests.append(request)
            try:
                response = self.handler(request)
            except Exception:  # report to the test, answer 500
                with self._lock:
                    self._errors.append(traceback.format_exc())
                response = Response(500, b"handler error", close=True)
            if response.abort:
                return
            conn_header = request.headers.get("connection", "").lower()
            close = (
                response.close
                or "close" in conn_header
                or (request.http_version == "HTTP/1.0" and "keep-alive" not in conn_header)
            )
            response.close = close
            self._send(stream, response, request.method)
            if close:
                return

    @staticmethod
    def _send(stream: socket.socket, response: Response, method: str) -> None:
        try:
            reason = http.HTTPStatus(response.status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {response.status} {reason}"]
        lower = {k.lower() for k in response.headers}
        no_body = method == "HEAD" or response.status in (204, 304) or response.status < 200
        for key, value in response.headers.items():
            lines.append(f"{key}: {value}")
        if "content-length" not in lower and response.status not in (204, 304):
            lines.append(f"Content-Length: {len(response.body)}")
        if "connection" not in lower:
            lines.append(f"Connection: {'close' if response.close else 'keep-alive'}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        stream.sendall(head if no_body else head + response.body)


class _Reader:
    """Buffered HTTP/1.1 request reader over a blocking socket."""

    def __init__(self, stream: socket.socket) -> None:
        self._stream = stream
        self._buf = bytearray()

    def _fill(self) -> bool:
        try:
            chunk = self._stream.recv(65536)
        except (ssl.SSLError, OSError):
            return False
        if not chunk:
            return False
        self._buf += chunk
        return True

    def _read_line(self, limit: int = _MAX_HEADER_BYTES) -> bytes | None:
        while True:
            idx = self._buf.find(b"\r\n")
            if idx >= 0:
                line = bytes(self._buf[:idx])
                del self._buf[: idx + 2]
                return line
            if len(self._buf) > limit:
                raise _HttpError("line too long")
            if not self._fill():
                return None

    def _read_exact(self, size: int) -> bytes | None:
        while len(self._buf) < size:
            if not self._fill():
                return None
        data = bytes(self._buf[:size])
        del self._buf[:size]
        return data

    def read_request(self, sni: str | None, conn_id: int) -> Request | None:
        """Next request, or None when the peer closed between requests."""
        line = self._read_line()
        while line == b"":  # tolerate stray CRLF between requests
            line = self._read_line()
        if line is None:
            return None
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise _HttpError(f"bad request line {line!r}")
        method, path, version = parts
        headers: dict[str, str] = {}
        total = 0
        while True:
            raw = self._read_line()
            if raw is None:
                raise _HttpError("connection closed inside headers")
            if raw == b"":
                break
            total += len(raw)
            if total > _MAX_HEADER_BYTES:
                raise _HttpError("headers too large")
            name, sep, value = raw.decode("latin-1").partition(":")
            if not sep:
                raise _HttpError(f"bad header line {raw!r}")
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        body = self._read_body(headers)
        return Request(method, path, headers, body, sni, version, conn_id)

    def _read_body(self, headers: dict[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = bytearray()
            while True:
                size_line = self._read_line()
                if size_line is None:
                    raise _HttpError("closed inside chunked body")
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self._read_line():  # skip trailers up to the blank line
                        pass
                    return bytes(body)
                chunk = self._read_exact(size + 2)
                if chunk is None:
                    raise _HttpError("closed inside chunk")
                body += chunk[:-2]
        length = int(headers.get("content-length", "0") or "0")
        if length == 0:
            return b""
        data = self._read_exact(length)
        if data is None:
            raise _HttpError("closed inside body")
        return data


def _accept_queue_full(listener: socket.socket) -> bool:
    """Linux TCP_INFO on a listener: tcpi_unacked = queued, tcpi_sacked = max."""
    try:
        info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (AttributeError, OSError):
        return False
    queued, limit = struct.unpack_from("II", info, 24)
    return bool(queued > limit)


class RefusingPort:
    """A reserved port whose connects fail with ECONNREFUSED.

    The socket is bound but never listens, so the kernel answers SYNs with
    RST while no other test can grab the port.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._sock: socket.socket | None = None
        self._port: int | None = None

    def start(self) -> RefusingPort:
        """Reserve the port."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((self.host, 0))
        self._sock = sock
        self._port = sock.getsockname()[1]
        return self

    def stop(self) -> None:
        """Release the port."""
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._port = None

    @property
    def port(self) -> int:
        """The refusing port (only valid while running)."""
        if self._port is None:
            raise RuntimeError("RefusingPort is not running")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to connect to."""
        return (self.host, self.port)

    def __enter__(self) -> RefusingPort:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class Blackhole(_Listener):
    """A port where connections go nowhere, to exercise timeouts.

    ``hang_connect=False`` (default): TCP connects succeed but nothing is
    ever sent back, so a TLS handshake or HTTP request hangs.  Connections and
    received bytes (e.g. the ClientHello) are counted.

    ``hang_connect=True``: the accept queue is filled and never drained, so
    the kernel drops further SYNs and ``connect()`` itself hangs.  Nothing can
    be counted in this mode.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, hang_connect: bool = False) -> None:
        super().__init__(host, port, backlog=0 if hang_connect else 128)
        self.hang_connect = hang_connect
        self._fillers: list[socket.socket] = []
        self._connections = 0
        self._received = 0

    def start(self) -> Blackhole:
        """Start listening (and fill the backlog in hang_connect mode)."""
        if not self.hang_connect:
            self._open()
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((self.host, self._requested_port))
        sock.listen(0)
        self._sock = sock
        self._port = sock.getsockname()[1]
        for _ in range(16):
            if _accept_queue_full(sock):
                return self
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            self._fillers.append(filler)
            with contextlib.suppress(BlockingIOError):
                filler.connect((self.host, self._port))
            _, writable, _ = select.select([], [filler], [], 1.0)
            if not writable:  # this SYN was dropped: the queue is full
                return self
        self.stop()
        raise RuntimeError("could not fill the accept queue")

    def stop(self) -> None:
        """Close everything."""
        for filler in self._fillers:
            filler.close()
        self._fillers.clear()
        if self.hang_connect:
            if self._sock is not None:
                self._sock.close()
            self._sock = None
            self._port = None
            return
        self._close()

    def __enter__(self) -> Blackhole:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def connections(self) -> int:
        """Connections accepted (always 0 in hang_connect mode)."""
        with self._lock:
            return self._connections

    @property
    def received_bytes(self) -> int:
        """Bytes received and discarded across all connections."""
        with self._lock:
            return self._received

    def _on_accept(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections += 1

    def _serve(self, conn: socket.socket, peer: tuple[str, int], seq: int) -> None:
        while not self._stop.is_set():
            data = conn.recv(65536)
            if not data:
                return
            with self._lock:
                self._received += len(data)
