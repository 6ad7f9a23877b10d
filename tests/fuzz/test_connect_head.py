"""sidecar.proxy.connect_head: a CONNECT head read from any client's first bytes.

What it reads must be exactly what mitmproxy's own HTTP/1 parser reads from the same
bytes (target, port, Proxy-Authorization): the early refusal (admission.py) acts on it
in the parser's place. Anything it declines goes to that parser, so declining is always
safe; reading differently never is.
"""

from __future__ import annotations

import base64

from h11._receivebuffer import ReceiveBuffer
from hypothesis import event, example, given
from hypothesis import strategies as st
from mitmproxy.net.http.http1 import read_request_head

from sidecar.judge.names import InvalidName, normalize_host
from sidecar.proxy.connect_head import ConnectHead, read_connect_head

LIMIT = 4096
AUTH = "Basic " + base64.b64encode(b"synapse:s3cret-pass").decode()

# Each part mostly plausible (so that many examples get past the reader's checks), with
# the odd and the random mixed in.
hosts = st.one_of(
    st.sampled_from(
        [
            "gone.example",
            "GONE.Example.",
            "xn--bcher-kva.example",
            "127.0.0.1",
            "[::1]",
            "[::ffff:127.0.0.1]",
            "a:b",
            "",
            "bücher.example",
            "a..b",
            "-a.example",
            "a_b.example",
        ]
    ),
    st.from_regex(r"[a-z0-9-]{1,12}(\.[a-z0-9-]{1,12}){0,3}\.?", fullmatch=True),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30),
)
ports = st.one_of(
    st.integers(1, 65535).map(str),
    st.sampled_from(["0", "65536", "00443", "", "99999", "+1", " 1"]),
)
plain_headers = st.sampled_from(
    [
        f"Proxy-Authorization: {AUTH}",
        f"proxy-authorization:{AUTH}  ",
        "Proxy-Authorization:",
        "Host: gone.example:443",
        "User-Agent: Synapse/1.163",
        "X-Tab:\tvalue",
    ]
)
odd_headers = st.one_of(
    st.sampled_from(
        [
            "Content-Length: 0",
            "Transfer-Encoding: chunked",
            " folded",
            "\tfolded",
            "NoColon",
            ": empty name",
            "X-Odd: \x7f",
            "X-Latin: \xe9",
            "Bad Name: x",
        ]
    ),
    st.text(max_size=40),
)
header_lines = st.one_of(plain_headers, plain_headers, plain_headers, odd_headers)
versions = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "http/1.1", "HTTP/1.1 "])
separators = st.sampled_from(["\r\n", "\n", "\r"])
methods = st.sampled_from(["CONNECT", "connect", "GET"])
ends = st.sampled_from(["\r\n", "\n", "", "\r\n\r\n"])


@st.composite
def connect_heads(draw: st.DrawFn, plain: bool) -> bytes:
    """A CONNECT head as a client writes it (`plain`), or with any part of it odd."""

    def part(usual: str, odd: st.SearchStrategy[str]) -> str:
        return usual if plain else draw(st.one_of(st.just(usual), odd))

    sep = part("\r\n", separators)
    line = f"{part('CONNECT', methods)} {draw(hosts)}:{draw(ports)} {part('HTTP/1.1', versions)}"
    headers = draw(st.lists(plain_headers if plain else header_lines, max_size=4))
    text = sep.join([line, *headers]) + sep + part("\r\n", ends)
    return text.encode("utf-8", "surrogatepass") + draw(st.binary(max_size=8))


def mitmproxy_reads(data: bytes) -> ConnectHead | None:
    """What mitmproxy's HTTP/1 server layer parses from the same bytes (None: 400)."""
    buffer = ReceiveBuffer()
    buffer += data
    lines = buffer.maybe_extract_lines()
    if not lines:
        return None
    try:
        request = read_request_head([bytes(x) for x in lines])
    except ValueError:
        return None
    if request.method != "CONNECT":
        return None
    return ConnectHead(request.host, request.port, request.headers.get("proxy-authorization"))


@given(
    st.one_of(connect_heads(plain=True), connect_heads(plain=False), st.binary(max_size=200)),
    st.integers(0, LIMIT),
)
@example(b"CONNECT gone.example:443 HTTP/1.1\r\n\r\n", LIMIT)
@example(b"CONNECT gone.example:443 HTTP/1.1\r\n\r\n", 37)  # exactly the head
@example(b"CONNECT gone.example:443 HTTP/1.1\r\n\r\n", 36)  # one byte over
@example(f"CONNECT a.example:1 HTTP/1.0\r\nProxy-Authorization: {AUTH}\r\n\r\n".encode(), LIMIT)
@example(b"CONNECT a.example:1 HTTP/1.1\r\nX: 1\r\n folded\r\n\r\n", LIMIT)
@example(b"CONNECT a.example:1 HTTP/1.1\r\nContent-Length: 5\r\n\r\n", LIMIT)
@example(b"CONNECT a..b:1 HTTP/1.1\r\n\r\n", LIMIT)  # read, then declined by the name check
@example(b"CONNECT [::1]:443 HTTP/1.1\r\n\r\n", LIMIT)
@example(b"CONNECT xn--bcher-kva.example:443 HTTP/1.1\r\n\r\n", LIMIT)
def test_what_it_reads_is_what_mitmproxy_reads(data: bytes, limit: int) -> None:
    head = read_connect_head(data, limit)
    event("declined" if head is None else "read")
    if head is None:
        return  # declined: mitmproxy's parser decides, as without the early refusal
    end = data.index(b"\r\n\r\n") + 4
    assert end <= limit
    try:
        name = normalize_host(head.host)
    except InvalidName:
        return  # the early refusal declines a name the sidecar cannot read (TunnelGate)
    event("compared with mitmproxy's parser")
    theirs = mitmproxy_reads(data)
    assert theirs is not None, data
    assert normalize_host(theirs.host) == name
    assert head.port == theirs.port
    assert head.proxy_authorization == theirs.proxy_authorization
    lowered = data[:end].lower()
    assert b"content-length" not in lowered and b"transfer-encoding" not in lowered


@given(st.binary(max_size=300), st.integers(-1, 1000))
def test_any_bytes_and_any_limit_give_a_head_or_none(data: bytes, limit: int) -> None:
    assert read_connect_head(data, limit) is None or data.startswith(b"CONNECT ")
