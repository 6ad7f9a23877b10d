"""Proxy authentication (Basic), for a sidecar that listens beyond loopback.

Synapse sends `Proxy-Authorization: Basic …` on every CONNECT when its proxy URL carries
credentials (`HTTPS_PROXY=http://user:pass@egress:3128`). The credentials file holds
`user:password` lines; comparisons are constant-time.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from sidecar.textfile import read_small_text

MAX_FILE_BYTES = 1024 * 1024
REALM = "tombstone-sidecar"
CHALLENGE = f'Basic realm="{REALM}"'


def read_credentials(path: str) -> dict[str, str]:
    """Parse a `user:password` file; ValueError names the file and line that is wrong."""
    text = read_small_text(path, MAX_FILE_BYTES)
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"{path} line {number}: expected user:password")
        users[user] = password
    if not users:
        raise ValueError(f"{path} has no user:password line")
    return users


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
