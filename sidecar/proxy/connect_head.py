"""A CONNECT request head read from a client's first bytes, before mitmproxy parses it.

The refusal of a CONNECT to a cached gone name needs only its target and, with
`--proxy-auth-file`, its `Proxy-Authorization`. Read here, at the layer decision, the
refusal skips mitmproxy's HTTP layer, its flow and the hooks that follow (admission.py).
This reader takes only the plainest heads: the whole head in the first bytes, CRLF line
ends, a `host:port` target, well-formed header lines, at most one `Proxy-Authorization`,
no body framing.
Anything else returns None and goes the usual way, through mitmproxy's own parser, so a
client can never be answered differently here than there except by being refused sooner.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# `CONNECT host:port HTTP/1.x`: a host of printable ASCII without spaces or slashes (the
# sidecar's own name check judges it), a port of one to five digits.
REQUEST_LINE = re.compile(rb"CONNECT ([!-.0-~]+):([0-9]{1,5}) HTTP/1\.[01]")
# `name: value`, the name an RFC 9110 token, the value visible ASCII, spaces and tabs.
HEADER_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e]*")
HEAD_END = b"\r\n\r\n"
AUTHORIZATION = b"proxy-authorization"
# Body framing on a CONNECT: mitmproxy validates it (400 when it is wrong); left to it.
FRAMING = (b"content-length", b"transfer-encoding")
MAX_PORT = 65535


@dataclass(frozen=True, slots=True)
class ConnectHead:
    """The parts of a CONNECT head a refusal needs."""

    host: str
    port: int
    proxy_authorization: str | None  # the one header's value, stripped; None when absent


def read_connect_head(data: bytes, limit: int) -> ConnectHead | None:
    """The CONNECT head at the start of `data`, if it is whole, plain and within `limit`
    bytes (the blank line included); else None (mitmproxy's parser decides)."""
    if not data.startswith(b"CONNECT "):
        return None
    end = data.find(HEAD_END, 0, limit + 1)
    if end < 0 or end + len(HEAD_END) > limit:
        return None
    lines = data[:end].split(b"\r\n")
    target = REQUEST_LINE.fullmatch(lines[0])
    if target is None:
        return None
    port = int(target[2])
    if not 0 < port <= MAX_PORT:
        return None
    authorization: str | None = None
    for line in lines[1:]:
        if HEADER_LINE.fullmatch(line) is None:
            return None  # a bare CR or LF, a folded line, a malformed name: not ours
        name, _, value = line.partition(b":")
        name = name.lower()
        if name in FRAMING:
            return None
        if name == AUTHORIZATION:
            if authorization is not None:
                return None  # sent twice: mitmproxy joins them; let it judge
            authorization = value.strip(b" \t").decode("ascii")
    return ConnectHead(target[1].decode("ascii"), port, authorization)
