"""The ops HTTP listener of a real sidecar process, fed hypothesis-made requests.

One request per connection: we send it, shut our side (the server sees end of input) and
read until the server closes. It must answer with a well-formed HTTP/1.1 response whenever
the request head is complete (and its body, for PUT/POST/DELETE), close otherwise, never
hang, never log a crash or a line that is not one whole log entry, never change a verdict
without the bearer token (whatever bytes the Authorization header holds), answer HEAD
with headers only, and still answer /healthz afterwards.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from sidecar.ops.wire import MAX_BODY_BYTES, REASONS
from tests.fuzz.processes import GuardedSidecar
from tests.fuzz.profiles import examples
from tests.fuzz.strategies import hostish, json_documents
from tests.support.dns_server import DnsServer
from tests.support.sidecar_process import exchange

TOKEN = "fuzz-token-0123456789abcdef"
ANSWER_WITHIN = 5.0  # seconds; the server has the whole request and end of input by then
STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\n")
LOG_ENTRY = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")  # cli.py's format


@pytest.fixture(scope="module")
def ops_sidecar(dns_server: DnsServer) -> Iterator[GuardedSidecar]:
    with tempfile.TemporaryDirectory(prefix="fuzz-ops-") as name:
        directory = Path(name)
        token = directory / "token"
        token.write_text(TOKEN + "\n")
        args = ["--deny", "denied.test", "--ops-token-file", str(token), "--store", "memory"]
        sidecar = GuardedSidecar(dns_server.port, args, log_dir=directory).start()
        try:
            sidecar.new_log()
            yield sidecar
        finally:
            sidecar.stop()


@dataclass(frozen=True)
class Expectation:
    answer: bool  # a complete request: the server must answer, not just close
    method: str = ""
    authorized: bool = False  # carries the right bearer token


def expect(data: bytes) -> Expectation:
    """What the ops server must do with `data` followed by end of input (its own rules:
    one request, head up to the blank line, a body only for PUT/POST/DELETE)."""
    head, blank, rest = data.partition(b"\r\n\r\n")
    if not blank:
        return Expectation(False)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return Expectation(True)
    method = parts[0]
    headers = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip().lower()] = value.strip()
    scheme, _, given_token = headers.get("authorization", "").partition(" ")
    authorized = scheme.lower() == "bearer" and given_token.strip() == TOKEN
    if method not in ("PUT", "POST", "DELETE"):
        return Expectation(True, method, authorized)
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        return Expectation(True, method, authorized)
    if not 0 <= length <= MAX_BODY_BYTES:
        return Expectation(True, method, authorized)
    return Expectation(len(rest) >= length, method, authorized)


# -- requests ------------------------------------------------------------------------------

names = st.one_of(hostish, st.sampled_from(["denied.test", "a.test", "..", "%2F", "[::1]"]))
paths = st.one_of(
    st.sampled_from(
        [
            "/metrics",
            "/healthz",
            "/readyz",
            "/v1/verdicts",
            "/v1/verdicts/",
            "/",
            "//[",
            "http://[::1",
            "*",
            "/v1/verdicts?limit=-1&offset=x",
            "/v1/verdicts?state=gone&signal=operator&limit=99999999999999999999",
        ]
    ),
    names.map(lambda n: "/v1/verdicts/" + quote(n, safe="")),
    names.map(lambda n: "/v1/verdicts/" + n),
    st.builds(
        lambda k, v: f"/v1/verdicts?{k}={v}",
        st.sampled_from(["state", "signal", "limit", "offset", "x"]),
        st.text(max_size=20),
    ),
    st.text(max_size=60),
)
methods = st.one_of(
    st.sampled_from(["GET", "HEAD", "PUT", "DELETE", "POST", "OPTIONS", "get", ""]),
    st.text(max_size=8),
)
header_pairs = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["Authorization", "authorization", " AUTHORIZATION "]),
            st.one_of(
                st.sampled_from(
                    [
                        f"Bearer {TOKEN}",
                        f"bearer  {TOKEN} ",
                        "Bearer x",
                        "Basic x",
                        TOKEN,
                        "",
                        "Bearer tökén",
                        f"Bearer {TOKEN}\u00e9",
                        "Bearer \u202e",
                        "Bearer \x00",
                    ]
                ),
                st.text(max_size=40).map(lambda t: f"Bearer {t}"),
            ),
        ),
        st.tuples(
            st.sampled_from(["Content-Length", "content-length"]),
            st.one_of(
                st.integers(-5, MAX_BODY_BYTES + 5).map(str),
                st.sampled_from(["", "x", "1e3", " 7 ", "9" * 5000, "0x10"]),
            ),
        ),
        st.tuples(st.text(max_size=20), st.text(max_size=40)),
    ),
    max_size=6,
)
bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda obj: json.dumps(obj).encode(), json_documents),
    st.builds(
        lambda ttl, comment: json.dumps({"ttl": ttl, "comment": comment}).encode(),
        st.one_of(
            st.sampled_from(
                ["30d", "1e308s", "1e300d", "3651d", "0", "-1s", "nan", "inf", "5e-324s"]
            ),
            st.floats(),
            json_documents,
        ),
        st.one_of(
            st.text(max_size=30),
            st.just("c" * 600),
            st.sampled_from(["two\nlines", "cr\r", "esc\x1b[2J", "sep\u2028", "ok comment"]),
            json_documents,
        ),
    ),
    st.integers(1, 50_000).map(lambda n: b"[" * n),  # deeper than any JSON parser recurses
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method, target = draw(methods), draw(paths)
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "", "HTTP/1.1 x"]))
    pairs = draw(header_pairs)
    body = draw(bodies)
    if draw(st.booleans()):  # usually a body of the declared length
        pairs = [p for p in pairs if p[0].strip().lower() != "content-length"]
        pairs.append(("Content-Length", str(len(body))))
    newline = draw(st.sampled_from(["\r\n", "\r\n", "\n"]))
    head = f"{method} {target} {version}{newline}" + "".join(f"{k}: {v}{newline}" for k, v in pairs)
    encoding = draw(st.sampled_from(["utf-8", "latin-1"]))
    return (head + newline).encode(encoding, "replace") + body


# -- the properties -----------------------------------------------------------------------------


@settings(max_examples=examples(ci=150, deep=3000), deadline=None)
@given(st.one_of(requests(), st.binary(max_size=2000)))
@example(b"GET /healthz HTTP/1.1\r\n\r\n")
@example(b"GET /v1/verdicts/%ff%fe HTTP/1.1\r\n\r\n")
@example(b"PUT /v1/verdicts/denied.test HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n")
@example(
    b"DELETE /v1/verdicts/denied.test HTTP/1.1\r\nAuthorization: Bearer "
    + TOKEN.encode()
    + b"\r\n\r\n"
)
@example(
    b"PUT /v1/verdicts/x.test HTTP/1.1\r\nAuthorization: Bearer "
    + TOKEN.encode()
    + b'\r\nContent-Length: 27\r\n\r\n{"ttl": "1e308s", "x": 1}  '
)
@example(b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 70_000 + b"\r\n\r\n")
@example(b"\r\n\r\n")
@example(
    b"DELETE /v1/verdicts/x.test HTTP/1.1\r\nAuthorization: Bearer t\xc3\xb6k\xc3\xa9n\r\n\r\n"
)
@example(b"HEAD /v1/verdicts HTTP/1.1\r\n\r\n")
@example(
    b"PUT /v1/verdicts/x.test HTTP/1.1\r\nAuthorization: Bearer "
    + TOKEN.encode()
    + b'\r\nContent-Length: 40\r\n\r\n{"ttl": "1e300d", "comment": "a\\nb"}    '
)
def test_ops_answers_or_closes_and_never_crashes(ops_sidecar: GuardedSidecar, data: bytes) -> None:
    expectation = expect(data)
    received, closed, _ = exchange(
        ops_sidecar.ops_port, data, half_close=True, timeout=ANSWER_WITHIN
    )
    assert closed, f"no close within {ANSWER_WITHIN}s (got {received[:100]!r}) for {data[:200]!r}"
    log = ops_sidecar.new_log()
    crashes = ops_sidecar.crashes(log)
    assert not crashes, f"{crashes} after {data[:300]!r}"
    torn = [line for line in log.splitlines() if not LOG_ENTRY.match(line)]
    assert not torn, f"log lines that are not log entries {torn[:3]} after {data[:300]!r}"
    if not received:
        assert not expectation.answer, f"closed without an answer to {data[:300]!r}"
        event("closed without an answer (incomplete request)")
        return
    match = STATUS_LINE.match(received)
    assert match, f"not an HTTP/1.1 status line: {received[:100]!r}"
    status = int(match.group(1))
    assert status in REASONS, status
    event(f"answered {status}")
    head, _, body = received.partition(b"\r\n\r\n")
    headers = dict(
        (k.strip().lower(), v.strip())
        for k, _, v in (line.partition(":") for line in head.decode("latin-1").split("\r\n")[1:])
    )
    if expectation.method == "HEAD":
        assert body == b"", f"HEAD answered with a body: {received[:200]!r}"
        return
    assert int(headers["content-length"]) == len(body)
    if headers.get("content-type") == "application/json":
        assert isinstance(json.loads(body), dict)
    if expectation.method in ("PUT", "DELETE") and not expectation.authorized:
        assert status not in (200, 409), f"{status} to an unauthorized {data[:300]!r}"


def test_ops_still_healthy_after_the_fuzzing(ops_sidecar: GuardedSidecar) -> None:
    assert ops_sidecar.ops("/healthz")[0] == 200
    assert ops_sidecar.ops("/readyz")[0] == 200
    assert ops_sidecar.process.alive


def test_regression_unparseable_target_gets_a_400(ops_sidecar: GuardedSidecar) -> None:
    """urlsplit() raised ValueError ('Invalid IPv6 URL'): no answer, the connection dropped,
    and 'Unhandled error in task' with a traceback in the log."""
    received, _, _ = exchange(
        ops_sidecar.ops_port, b"GET //[ HTTP/1.1\r\n\r\n", half_close=True, timeout=ANSWER_WITHIN
    )
    crashes = ops_sidecar.crashes(ops_sidecar.new_log())
    assert received.startswith(b"HTTP/1.1 400 "), (received, crashes)
    assert not crashes


def test_regression_deeply_nested_put_body_gets_a_400(ops_sidecar: GuardedSidecar) -> None:
    """json.loads() raised RecursionError, not ValueError: no answer, a traceback logged."""
    body = b"[" * 10_000
    request = (
        b"PUT /v1/verdicts/deep.test HTTP/1.1\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    received, _, _ = exchange(ops_sidecar.ops_port, request, half_close=True, timeout=ANSWER_WITHIN)
    crashes = ops_sidecar.crashes(ops_sidecar.new_log())
    assert received.startswith(b"HTTP/1.1 400 "), (received, crashes)
    assert not crashes
