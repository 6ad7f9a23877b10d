"""The X-Matrix `Authorization` header: which server a federation request is for.

`Authorization: X-Matrix origin="a.example",destination="b.example",key="ed25519:x",sig="…"`
(Matrix server-server API, "Request Authentication"). Parameters are comma-separated
`name=value` pairs; values are quoted strings (with backslash escapes) or bare tokens.
The `destination` parameter is what verdicts are keyed by inside pooled tunnels, where the
Host header may name a delegated target shared by several servers.

The list is split by the standard library (`urllib.request.parse_http_list`: commas outside
quotes, backslash escapes undone); this module checks each `name=value`. Like Synapse, which
reads the header it receives by splitting at commas only, parameters separated by spaces
alone are an error. (`parse_keqv_list` does not fit: it raises IndexError on `name=`.)
"""

from __future__ import annotations

from urllib.request import parse_http_list

SCHEME = "x-matrix"
MAX_HEADER = 8192  # a real header is a few hundred bytes
_TOKEN_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~:[]"
)


class XMatrixError(ValueError):
    """A malformed X-Matrix header; the message says where."""


def parse(header: str) -> dict[str, str]:
    """All parameters of an X-Matrix header (names lowercased)."""
    if len(header) > MAX_HEADER:
        raise XMatrixError(f"header longer than {MAX_HEADER} characters")
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != SCHEME:
        raise XMatrixError(f"scheme is {scheme[:20]!r}, not X-Matrix")
    params: dict[str, str] = {}
    # parse_http_list splits at commas outside quotes and drops the backslash of each escape.
    for part in parse_http_list(rest):
        if not part:
            continue  # ",," between parameters
        name, sep, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not sep:
            raise XMatrixError(f"parameter without '=' in {part[:20]!r}")
        if not name or any(c not in _TOKEN_CHARS for c in name):
            raise XMatrixError(f"bad parameter name {name[:20]!r}")
        if value.startswith('"'):
            if len(value) < 2 or not value.endswith('"'):
                raise XMatrixError(f"unterminated quoted value of {name}")
            value = value[1:-1]
        elif any(c not in _TOKEN_CHARS for c in value):
            raise XMatrixError(f"bad character in the value of {name}")
        params[name] = value
    return params


def destination(header: str | None) -> str | None:
    """The `destination` of an X-Matrix header, None when absent; XMatrixError if garbage."""
    if not header or not header.strip().lower().startswith(SCHEME):
        return None
    return parse(header).get("destination") or None
