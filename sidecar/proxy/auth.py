"""Proxy authentication (Basic), for a sidecar that listens beyond loopback.

Synapse sends `Proxy-Authorization: Basic …` on every CONNECT when its proxy URL carries
credentials (`HTTPS_PROXY=http://user:pass@egress:3128`). The credentials file holds
`user:password` lines; comparisons are constant-time.
"""

from __future__ import annotations

import base64
import binascii
import hmac

REALM = "tombstone-sidecar"
CHALLENGE = f'Basic realm="{REALM}"'


class ProxyAuth:
    def __init__(self, users: dict[str, str]) -> None:
        self._users = users

    def check(self, header: str | None) -> bool:
        """True when `Proxy-Authorization` carries a known user with the right password."""
        if not header:
            return False
        scheme, _, encoded = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
        user, sep, password = decoded.partition(":")
        given = password.encode()  # bytes: compare_digest refuses non-ASCII str
        expected = self._users.get(user)
        if not sep or expected is None:
            hmac.compare_digest(given, given)  # same work for unknown users
            return False
        return hmac.compare_digest(given, expected.encode())
