"""Server names from the outside world (CONNECT targets, SNI, Host, deny lists), normalized.

Every verdict is keyed by the normalized form, so `Example.ORG.`, `example.org` and
`xn--...` spellings of one server share one verdict. Anything that cannot be a DNS name
or an IP literal is rejected with an `InvalidName` that says exactly why.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

MAX_NAME_LENGTH = 253  # RFC 1035 limit for a name in presentation form, without trailing dot
MAX_LABEL_LENGTH = 63  # RFC 1035 limit per label
DEFAULT_PORT = 443  # CONNECT without a port is unusual; HTTPS is what a homeserver proxies
NAME_CACHE_SIZE = 65536  # distinct raw spellings remembered; a few MB at most

# Characters a label may carry after IDNA encoding. Underscore is not a hostname character,
# but it is legal in DNS and appears in real names (`_matrix-fed._tcp`), so it passes.
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


class InvalidName(ValueError):
    """A server name, authority or SNI that cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class Authority:
    """A normalized `host:port` pair, as in a CONNECT request line."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def is_ip_literal(host: str) -> bool:
    """True for an IPv4 or IPv6 address literal (without brackets)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=NAME_CACHE_SIZE)
def normalize_host(raw: str) -> str:
    """Return the canonical form of a DNS name or IP literal.

    Lowercase, IDNA (punycode) for non-ASCII labels, no trailing dot; IPv6 literals lose their
    brackets and take their compressed form. Cached: every connection normalizes its target
    and SNI, and a homeserver talks to the same few thousand names over and over (errors
    are not cached, so garbage cannot fill it).
    """
    if not isinstance(raw, str):
        raise InvalidName(f"expected a name, got {type(raw).__name__}")
    host = raw.strip()
    if not host:
        raise InvalidName("empty name")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if "%" in host:
        raise InvalidName(f"{_shorten(raw)}: an IPv6 zone ID names a local interface, not a server")
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError as e:
            reason = _shorten(str(e), 60)
            raise InvalidName(f"{_shorten(raw)} is not a valid IPv6 literal ({reason})") from None
    if bracketed:
        raise InvalidName(f"{_shorten(raw)}: only IPv6 literals go in brackets")
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise InvalidName("the root name '.' is not a server name")
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    labels = host.split(".")
    encoded = [_encode_label(label, raw) for label in labels]
    name = ".".join(encoded)
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(
            f"{_shorten(raw)} is {len(name)} characters long; DNS allows {MAX_NAME_LENGTH}"
        )
    return name


def _encode_label(label: str, raw: str) -> str:
    if not label:
        raise InvalidName(f"{_shorten(raw)} has an empty label")
    if label.isascii():
        ascii_label = label.lower()
    else:
        try:
            ascii_label = label.encode("idna").decode("ascii")
        except UnicodeError as e:
            reason = _shorten(str(e))
            raise InvalidName(
                f"{_shorten(raw)}: label {_shorten(label)} is not valid IDNA ({reason})"
            ) from None
        ascii_label = ascii_label.lower()
    if len(ascii_label) > MAX_LABEL_LENGTH:
        raise InvalidName(
            f"{_shorten(raw)}: label {_shorten(label)} is {len(ascii_label)} characters long; "
            f"DNS allows {MAX_LABEL_LENGTH}"
        )
    bad = set(ascii_label) - _LABEL_CHARS
    if bad:
        shown = "".join(sorted(bad))
        raise InvalidName(f"{_shorten(raw)}: label {_shorten(label)} contains {shown!r}")
    if ascii_label.startswith("-") or ascii_label.endswith("-"):
        raise InvalidName(f"{_shorten(raw)}: label {_shorten(label)} starts or ends with '-'")
    return ascii_label


def parse_authority(raw: str, default_port: int = DEFAULT_PORT) -> Authority:
    """Parse `host`, `host:port`, `[v6]:port` or `v6` into a normalized `Authority`."""
    text = raw.strip()
    if not text:
        raise InvalidName("empty authority")
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise InvalidName(f"{_shorten(raw)}: '[' without ']'")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise InvalidName(f"{_shorten(raw)}: unexpected {rest!r} after ']'")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    port = _parse_port(port_text, raw) if port_text or text.endswith(":") else default_port
    return Authority(normalize_host(host), port)


def _parse_port(text: str, raw: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        raise InvalidName(f"{_shorten(raw)}: port {_shorten(text)} is not a number from 1 to 65535")
    port = int(text)
    if not 0 < port < 65536:
        raise InvalidName(f"{_shorten(raw)}: port {port} is outside 1-65535")
    return port


def is_under(name: str, suffix: str) -> bool:
    """True if normalized `name` equals `suffix` or is a subdomain of it."""
    return name == suffix or name.endswith("." + suffix)


def _shorten(text: str, limit: int = 80) -> str:
    """Quote outside input for an error message without letting it flood the log."""
    return repr(text if len(text) <= limit else text[:limit] + "…")
