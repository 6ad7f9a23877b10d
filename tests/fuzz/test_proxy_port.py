"""The proxy port of a real sidecar process, fed hypothesis-made CONNECT and proxy requests.

Every request gets an HTTP answer or a close, never a hang and never a crash in the log; a
CONNECT to a denied name is refused however it is spelled; with --proxy-auth-file only the
right credentials get past 407; and the proxy keeps serving normal requests afterwards.
The process runs under tests/fuzz/loopback_only.py: nothing it dials leaves loopback.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from sidecar.proxy.answers import SIGNAL_HEADER
from tests.fuzz.processes import GuardedSidecar
from tests.fuzz.profiles import examples
from tests.fuzz.strategies import authorities, dns_names, hostish
from tests.support.dns_server import DnsServer
from tests.support.procs import closed_within, wait_until

DENIED = "denied.test"
USERS = {"synapse": "s3cret-pass", "üser": "pässwörd"}
ANSWER_WITHIN = 4.0  # a DNS lookup against the loopback server takes milliseconds
CLOSE_WITHIN = 4.0  # after our end of input
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) [^\r\n]*\r\n")
BASE_ARGS = ["--deny", DENIED, "--refusal", "status", "--store", "memory"]


def start(dns_server: DnsServer, directory: Path, *extra: str) -> GuardedSidecar:
    sidecar = GuardedSidecar(dns_server.port, [*BASE_ARGS, *extra], log_dir=directory).start()
    sidecar.new_log()
    return sidecar


@pytest.fixture(scope="module")
def proxy(dns_server: DnsServer) -> Iterator[GuardedSidecar]:
    with tempfile.TemporaryDirectory(prefix="fuzz-proxy-") as name:
        sidecar = start(dns_server, Path(name))
        try:
            yield sidecar
        finally:
            sidecar.stop()


@pytest.fixture(scope="module")
def auth_proxy(dns_server: DnsServer) -> Iterator[GuardedSidecar]:
    with tempfile.TemporaryDirectory(prefix="fuzz-auth-") as name:
        users = Path(name) / "users"
        users.write_text("".join(f"{u}:{p}\n" for u, p in USERS.items()), encoding="utf-8")
        sidecar = start(dns_server, Path(name), "--proxy-auth-file", str(users))
        try:
            yield sidecar
        finally:
            sidecar.stop()


@dataclass
class Outcome:
    received: bytes
    phase: str  # "answered" or "closed" (before our EOF), "closed-after-eof", "hung"

    @property
    def status(self) -> int | None:
        match = STATUS_LINE.match(self.received)
        return int(match.group(1)) if match else None

    def header(self, name: str) -> str | None:
        head = self.received.partition(b"\r\n\r\n")[0].decode("latin-1")
        for line in head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


def send(port: int, data: bytes) -> Outcome:
    """Send `data`; wait for a response head or a close; if neither comes and the request
    may be incomplete, end our side and wait for the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_WITHIN) as sock:
        received = b""
        with contextlib.suppress(OSError):  # the proxy may close before taking it all
            sock.sendall(data)
        looks_complete = b"\r\n\r\n" in data or b"\n\n" in data
        phases = [("answered", ANSWER_WITHIN)] if looks_complete else []
        phases.append(("closed-after-eof", CLOSE_WITHIN))
        for phase, wait in phases:
            if phase == "closed-after-eof":
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + wait
            while b"\r\n\r\n" not in received:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                sock.settimeout(remaining)
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    break
                except OSError:
                    chunk = b""
                if not chunk:
                    closed = "closed" if phase == "answered" else phase
                    return Outcome(received, "answered" if received else closed)
                received += chunk
            if b"\r\n\r\n" in received:
                return Outcome(received, "answered" if phase == "answered" else phase)
        return Outcome(received, "hung")


# -- requests ------------------------------------------------------------------------------


def weighted(
    common: st.SearchStrategy[str], rare: st.SearchStrategy[str]
) -> st.SearchStrategy[str]:
    """`common` about nine times in ten (st.one_of picks each branch equally often). The
    simplest draw, which hypothesis favours and shrinks towards, is `common`."""
    return st.sampled_from(range(10)).flatmap(lambda i: rare if i == 9 else common)


@st.composite
def denied_spellings(draw: st.DrawFn) -> str:
    name = "".join(c.upper() if draw(st.booleans()) else c for c in DENIED)
    name += draw(st.sampled_from(["", "."]))
    return name + draw(st.sampled_from([":443"] * 4 + [":1", ":65535", ":8448", ":00443", ""]))


token = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
# Mostly what a client could really send, so that most requests get past mitmproxy's own
# parser to the sidecar's hooks; some of everything else.
denied_targets = denied_spellings()
name_targets = st.builds(lambda n, p: f"{n}:{p}", dns_names(max_labels=3), st.integers(0, 70000))
ip_targets = st.builds(
    lambda ip, p: f"[{ip}]:{p}" if ip.version == 6 else f"{ip}:{p}",
    st.ip_addresses(),
    st.integers(1, 65535),
)
targets = weighted(
    st.one_of(denied_targets, name_targets, ip_targets),
    st.one_of(
        authorities(),
        st.builds(
            lambda h, p: f"http://{h}{p}",
            st.one_of(denied_spellings(), hostish),
            st.sampled_from(["/", "/_matrix/federation/v1/version", ""]),
        ),
        st.sampled_from(
            [
                "*",
                "/",
                "",
                "[::1]:443",
                "127.0.0.1:1",
                "[",
                ":443",
                "a:b:c",
                "0x7f.1:443",
                "①.test:443",
            ]
        ),
    ),
)
methods = weighted(st.sampled_from(["CONNECT"] * 6 + ["GET", "connect", ""]), token)
versions = st.sampled_from(["HTTP/1.1"] * 6 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.1x", ""])
newlines = st.sampled_from(["\r\n"] * 6 + ["\n", "\r"])
header_pairs = st.lists(
    st.one_of(
        st.tuples(st.just("Host"), st.one_of(denied_spellings(), authorities())),
        st.tuples(st.from_regex(r"X-[A-Za-z0-9-]{1,20}", fullmatch=True), header_text),
        st.tuples(st.just("User-Agent"), st.just("Synapse/1.163.2")),
        st.tuples(
            st.just("Proxy-Authorization"),
            st.one_of(
                header_text,
                st.binary(max_size=30).map(lambda b: "Basic " + base64.b64encode(b).decode()),
            ),
        ),
        st.tuples(
            st.sampled_from(
                ["Content-Length", "Transfer-Encoding", "Connection", "Expect", "Upgrade"]
            ),
            st.sampled_from(
                ["0", "5", "-1", "99999999999", "chunked", "close", "100-continue", "websocket", ""]
            ),
        ),
        st.tuples(st.text(max_size=20), st.text(max_size=40)),
    ),
    max_size=4,
)


@dataclass(frozen=True)
class Request:
    data: bytes
    connect_to: str | None  # the authority of a well-formed CONNECT, else None


@st.composite
def requests(draw: st.DrawFn) -> Request:
    method, target, version = draw(methods), draw(targets), draw(versions)
    pairs = draw(header_pairs)
    newline = draw(newlines)
    head = f"{method} {target} {version}{newline}"
    head += "".join(f"{k}: {v}{newline}" for k, v in pairs) + newline
    data = head.encode(draw(st.sampled_from(["utf-8", "latin-1"])), "replace")
    data += draw(st.sampled_from([b"", b"", b"\x16\x03\x01\x00\x05hello", b"0\r\n\r\n"]))
    # Well formed: a CONNECT an HTTP/1.1 client could send (ASCII, CRLF, plain headers).
    simple_headers = all(
        re.fullmatch(r"[A-Za-z-]+", k)
        and re.fullmatch(r"[\x20-\x7e]*", v)
        and k != "Expect"
        and k not in ("Content-Length", "Transfer-Encoding", "Upgrade")
        for k, v in pairs
    )
    well_formed = (
        method == "CONNECT"
        and version == "HTTP/1.1"
        and newline == "\r\n"
        and simple_headers
        and re.fullmatch(r"[\x21-\x7e]+", target) is not None
        and data.endswith(b"\r\n\r\n")
    )
    return Request(data, target if well_formed else None)


# -- the properties -----------------------------------------------------------------------------


def check_outcome(sidecar: GuardedSidecar, data: bytes, outcome: Outcome) -> None:
    assert outcome.phase != "hung", f"no answer and no close for {data[:300]!r}"
    if outcome.received:
        assert outcome.status is not None, f"not a status line: {outcome.received[:100]!r}"
    log = sidecar.new_log()
    assert not sidecar.crashes(log), f"crash after {data[:300]!r} (or the request before):\n{log}"
    if sidecar.guarded(log):
        event("the loopback guard refused a public destination")
    event(f"{outcome.phase} {outcome.status}")


@settings(max_examples=examples(ci=150, deep=3000), deadline=None)
@given(st.one_of(requests(), st.binary(max_size=1000).map(lambda b: Request(b, None))))
@example(Request(b"CONNECT denied.test:443 HTTP/1.1\r\nHost: denied.test:443\r\n\r\n", DENIED))
@example(Request(b"CONNECT DENIED.TEST.:443 HTTP/1.1\r\n\r\n", "DENIED.TEST.:443"))
@example(Request(b"CONNECT [::1:443 HTTP/1.1\r\n\r\n", "[::1:443"))
@example(Request(b"CONNECT a b c d\r\n\r\n", None))
@example(Request(b"GET / HTTP/1.1\r\nHost: denied.test\r\n\r\n", None))
@example(Request(b"\x16\x03\x01\x00\x05hello", None))
@example(Request(b"CONNECT denied.test:443 HTTP/1.1\r\n", None))
def test_proxy_answers_or_closes_and_refuses_denied_names(
    proxy: GuardedSidecar, req: Request
) -> None:
    outcome = send(proxy.proxy_port, req.data)
    check_outcome(proxy, req.data, outcome)
    if req.connect_to is not None:
        assert outcome.phase in ("answered", "closed"), (req, outcome)
        host = req.connect_to.rpartition(":")[0] if ":" in req.connect_to else ""
        if (host or req.connect_to).rstrip(".").lower() == DENIED:
            assert outcome.status != 200, f"a tunnel to {req.connect_to}"
            if outcome.status == 502:
                assert outcome.header(SIGNAL_HEADER) == "operator", outcome


def test_proxy_keeps_serving_after_the_fuzzing(proxy: GuardedSidecar) -> None:
    outcome = send(
        proxy.proxy_port, b"CONNECT denied.test:443 HTTP/1.1\r\nHost: denied.test:443\r\n\r\n"
    )
    assert outcome.status == 502 and outcome.header(SIGNAL_HEADER) == "operator", outcome
    assert proxy.ops("/healthz")[0] == 200 and proxy.process.alive


# -- with --proxy-auth-file ---------------------------------------------------------------------

credential_text = st.one_of(
    st.sampled_from([*USERS, *USERS.values(), "", "x"]), st.text(max_size=12)
)
auth_values = st.one_of(
    header_text,
    st.tuples(
        st.sampled_from(["Basic", "basic", "BASIC", "bAsIc"]),
        st.sampled_from([" ", "\t"]),
        st.sampled_from(sorted(USERS.items())).map(
            lambda up: base64.b64encode(f"{up[0]}:{up[1]}".encode()).decode()
        ),
    ).map("".join),
    st.tuples(
        st.sampled_from(["Basic", "basic", "BASIC", "Bearer", ""]),
        st.sampled_from([" ", "  ", "\t"]),
        st.tuples(credential_text, st.sampled_from([":", "", "::"]), credential_text).map(
            lambda t: base64.b64encode("".join(t).encode("utf-8", "surrogatepass")).decode()
        ),
    ).map("".join),
)


def right_credentials(value: str | None) -> bool:
    if value is None:
        return False
    scheme, _, encoded = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return False
    user, sep, password = decoded.partition(":")
    return bool(sep) and USERS.get(user) == password


def connect_with(value: str | None) -> bytes:
    auth = f"Proxy-Authorization: {value}\r\n" if value is not None else ""
    return f"CONNECT {DENIED}:443 HTTP/1.1\r\nHost: {DENIED}:443\r\n{auth}\r\n".encode()


@settings(max_examples=examples(ci=100, deep=1500), deadline=None)
@given(st.one_of(st.none(), auth_values))
@example(None)
@example("Basic " + base64.b64encode(b"synapse:s3cret-pass").decode())
@example("basic\t" + base64.b64encode("üser:pässwörd".encode()).decode())
@example("Basic " + base64.b64encode(b"synapse:s3cret-pass\n").decode())
def test_only_the_right_credentials_get_past_407(
    auth_proxy: GuardedSidecar, value: str | None
) -> None:
    data = connect_with(value)
    outcome = send(auth_proxy.proxy_port, data)
    check_outcome(auth_proxy, data, outcome)
    if right_credentials(value):
        assert outcome.status == 502 and outcome.header(SIGNAL_HEADER) == "operator", outcome
    else:
        assert outcome.status == 407, (value, outcome)
        assert outcome.header("Proxy-Authenticate") == 'Basic realm="tombstone-sidecar"'


def test_regression_non_ascii_password_of_unknown_user_gets_407(
    auth_proxy: GuardedSidecar,
) -> None:
    """Found by the property above: ProxyAuth.check raised TypeError, the http_connect hook
    died and mitmproxy answered 200 Connection established: a tunnel without credentials."""
    value = "Basic " + base64.b64encode("nobody:pässword".encode()).decode()
    outcome = send(auth_proxy.proxy_port, connect_with(value))
    assert outcome.status == 407, outcome
    assert not auth_proxy.crashes(auth_proxy.new_log())


# -- before admission: --max-head-size and --head-timeout ------------------------------------

HEAD_LIMIT = 2048
HEAD_DEADLINE = 1.0


@pytest.fixture(scope="module")
def limited_proxy(dns_server: DnsServer) -> Iterator[GuardedSidecar]:
    with tempfile.TemporaryDirectory(prefix="fuzz-limits-") as name:
        users = Path(name) / "users"
        users.write_text("".join(f"{u}:{p}\n" for u, p in USERS.items()), encoding="utf-8")
        sidecar = start(
            dns_server,
            Path(name),
            "--proxy-auth-file",
            str(users),
            "--max-head-size",
            str(HEAD_LIMIT),
            "--head-timeout",
            f"{HEAD_DEADLINE:g}s",
        )
        try:
            yield sidecar
        finally:
            sidecar.stop()


@dataclass(frozen=True)
class Head:
    chunks: tuple[bytes, ...]
    length: int | None  # bytes up to and including the blank line; None: never ends
    leading_blank: bool

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


@st.composite
def heads(draw: st.DrawFn) -> Head:
    """A request head of any size around the limit, ended or not, in any number of reads."""
    newline = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
    blank = draw(st.sampled_from([b"", b"", b"\r\n", b"\n\r\n"]))
    line = draw(
        st.sampled_from([b"CONNECT denied.test:443 HTTP/1.1", b"GET http://x.test/ HTTP/1.1"])
    )
    pads = draw(st.lists(st.integers(0, 1200), max_size=4))
    head = blank + line + newline + b"".join(b"X-Pad: " + b"p" * n + newline for n in pads)
    ends = draw(st.booleans())
    if ends:
        head += newline
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(head) - 1)), max_size=3, unique=True)))
    chunks = tuple(head[a:b] for a, b in zip([0, *cuts], [*cuts, len(head)], strict=True) if a < b)
    return Head(chunks, len(head) if ends else None, bool(blank))


PREFIX = b"CONNECT denied.test:443 HTTP/1.1\r\nX: "


def one_read(data: bytes) -> Head:
    end = re.search(rb"\n\r?\n", data)
    return Head((data,), end.end() if end else None, False)


def feed(port: int, head: Head, wait: float) -> tuple[bytes, bool, float]:
    """Send the chunks (a pause between them: separate reads), never end our side; read until
    the proxy answers and closes, or `wait` passes: (received, closed, seconds)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        with contextlib.suppress(OSError):
            for chunk in head.chunks:
                sock.sendall(chunk)
                time.sleep(0.02)
        closed, received = closed_within(sock, started + wait - time.monotonic())
    return received, closed, time.monotonic() - started


@settings(max_examples=examples(ci=40, deep=600), deadline=None)
@given(heads())
@example(one_read(b"CONNECT denied.test:443 HTTP/1.1\r\nX: " + b"a" * HEAD_LIMIT))
@example(one_read(PREFIX + b"a" * (HEAD_LIMIT - len(PREFIX) - 4) + b"\r\n\r\n"))  # the limit
@example(one_read(PREFIX + b"a" * (HEAD_LIMIT - len(PREFIX) - 3) + b"\r\n\r\n"))  # one over
@example(Head((b"CONNECT denied.test:443 HTTP/1.1\r", b"\n\r", b"\n"), 36, False))
def test_heads_over_the_limit_get_431_and_unfinished_ones_the_deadline(
    limited_proxy: GuardedSidecar, head: Head
) -> None:
    def refused(reason: str) -> float:
        return limited_proxy.metric("tombstone_admission_refused_total", reason=reason)

    too_large, timeout = refused("too_large"), refused("timeout")
    received, closed, seconds = feed(limited_proxy.proxy_port, head, HEAD_DEADLINE + 4)
    assert closed, f"still open after {seconds:.1f}s: {head.data[:200]!r}"
    status = STATUS_LINE.match(received)
    over = (head.length if head.length is not None else len(head.data)) > HEAD_LIMIT
    if over:  # refused on the bytes (a reset may overtake the 431 while we still send)
        assert status is None or status.group(1) == b"431", received[:200]
        assert wait_until(lambda: refused("too_large") == too_large + 1), head
    elif head.length is not None and not head.leading_blank:
        assert status is not None and status.group(1) == b"407", (head, received[:200])
    else:  # unfinished (or stalled by mitmproxy on a blank line first): closed at the deadline
        assert received == b"" or (status is not None and status.group(1) == b"407"), received
        if not received:
            assert seconds > HEAD_DEADLINE - 0.3, seconds
            assert wait_until(lambda: refused("timeout") == timeout + 1), head
    event("431" if over else (status.group(1).decode() if status else "closed at the deadline"))
    assert not limited_proxy.crashes(limited_proxy.new_log())
