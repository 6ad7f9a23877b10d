"""The X-Matrix `Authorization` header: which server a federation request is for.

`Authorization: X-Matrix origin="a.example",destination="b.example",key="ed25519:x",sig="…"`
(Matrix server-server API, "Request Authentication"). Parameters are comma-separated
`name=value` pairs; values are quoted strings (with backslash escapes) or bare tokens.
The `destination` parameter is what verdicts are keyed by inside pooled tunnels, where the
Host header may name a delegated target shared by several servers.
"""

from __future__ import annotations

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
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t,":
            i += 1
        if i >= n:
            break
        eq = rest.find("=", i)
        if eq < 0:
            raise XMatrixError(f"parameter without '=' at offset {i}")
        name = rest[i:eq].strip().lower()
        if not name or any(c not in _TOKEN_CHARS for c in name):
            raise XMatrixError(f"bad parameter name {name[:20]!r}")
        i = eq + 1
        while i < n and rest[i] in " \t":
            i += 1
        if i < n and rest[i] == '"':
            value, i = _quoted(rest, i + 1)
        else:
            start = i
            while i < n and rest[i] not in ", \t":
                if rest[i] not in _TOKEN_CHARS:
                    raise XMatrixError(f"bad character {rest[i]!r} in the value of {name}")
                i += 1
            value = rest[start:i]
        params[name] = value
    return params


def _quoted(text: str, i: int) -> tuple[str, int]:
    out = []
    while i < len(text):
        c = text[i]
        if c == "\\":
            if i + 1 >= len(text):
                break
            out.append(text[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(out), i + 1
        out.append(c)
        i += 1
    raise XMatrixError("unterminated quoted value")


def destination(header: str | None) -> str | None:
    """The `destination` of an X-Matrix header, None when absent; XMatrixError if garbage."""
    if not header or not header.strip().lower().startswith(SCHEME):
        return None
    return parse(header).get("destination") or None
