"""Parsers of one option value each: text (or a YAML scalar) in, a typed value or ValueError out.

Pure, small and fuzzed (tests/fuzz/test_options.py); the option table in `options.py` names
one of these for each option. A ValueError's text is the problem only; the caller adds
where the value came from (a flag, a `TOMBSTONE_*` variable, a file and line).
"""

from __future__ import annotations

from sidecar.config.files import read_small_text
from sidecar.dns.client import Nameserver
from sidecar.judge.names import (
    Authority,
    InvalidName,
    is_ip_literal,
    normalize_host,
    parse_authority,
)

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# No setting means more than ten years (the operator deny list's own lifetime); a longer
# one would put expiry times past what the stores read back (the year 9999) or Redis takes.
MAX_DURATION_SECONDS = 3650 * 86400
MAX_DENY_FILE_BYTES = 16 * 1024 * 1024  # a deny list larger than this is a mistake
LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_duration(text: str) -> float:
    """`300`, `300s`, `5m`, `24h`, `30d` → seconds."""
    value = text.strip().lower()
    unit = 1
    if value and value[-1] in DURATION_UNITS:
        unit = DURATION_UNITS[value[-1]]
        value = value[:-1]
    try:
        seconds = float(value) * unit
    except ValueError:
        raise ValueError(f"{text!r} is not a duration (examples: 30s, 5m, 24h, 7d)") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{text!r} must be a positive duration")
    if seconds > MAX_DURATION_SECONDS:
        raise ValueError(f"{text!r} is longer than 3650d (10 years), the longest duration")
    return seconds


def parse_listen(text: str) -> Authority:
    """`HOST:PORT` for a listener; the host must be an IP literal or `localhost`."""
    if not text.strip():
        raise ValueError("an address is required (HOST:PORT)")
    try:
        authority = parse_authority(text, default_port=0)
    except InvalidName as e:
        raise ValueError(str(e)) from None
    if authority.port == 0:
        raise ValueError(f"{text!r} has no port (HOST:PORT)")
    if not is_ip_literal(authority.host) and authority.host != "localhost":
        raise ValueError(f"{authority.host!r} is not an IP address to listen on")
    return authority


def parse_nameserver(text: str) -> Nameserver:
    try:
        authority = parse_authority(text, default_port=53)
    except InvalidName as e:
        raise ValueError(str(e)) from None
    if not is_ip_literal(authority.host):
        raise ValueError(f"{text!r}: a nameserver must be an IP address")
    return Nameserver(authority.host, authority.port)


def parse_name(text: str) -> str:
    try:
        return normalize_host(text)
    except InvalidName as e:
        raise ValueError(str(e)) from None


def parse_int(text: object, low: int, high: int) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if not low <= value <= high:
        raise ValueError(f"{value} is outside {low}-{high}")
    return value


SIZE_UNITS = {"k": 1024, "m": 1024 * 1024}


def parse_size(text: object, low: int, high: int) -> int:
    """`65536`, `64k`, `1m` → bytes."""
    value = str(text).strip().lower().removesuffix("b").removesuffix("i")
    unit = SIZE_UNITS.get(value[-1:], 1)
    digits = value[:-1] if unit > 1 else value
    try:
        size = int(digits) * unit
    except ValueError:
        raise ValueError(f"{text!r} is not a size (examples: 65536, 64k, 1m)") from None
    if not low <= size <= high:
        raise ValueError(f"{text!r} is outside {low}-{high} bytes")
    return size


def parse_pending(text: object) -> int:
    """A positive whole number, or `auto` (0: computed from the open-file limit at start)."""
    if str(text).strip().lower() == "auto":
        return 0
    return parse_int(text, 1, 1_000_000)


def parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not true or false")


def read_name_file(path: str) -> tuple[str, ...]:
    """Read a deny/allow file; every bad line is reported with its number.

    Names are normalized without `normalize_host`'s cache: a 300,000-line file would evict
    every name the proxy's hot path keeps there."""
    text = read_small_text(path, MAX_DENY_FILE_BYTES)
    normalize = normalize_host.__wrapped__
    names = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            names.append(normalize(entry))
        except InvalidName as e:
            raise ValueError(f"{path} line {number}: {e}") from None
    return tuple(names)


def parse_store(text: str) -> str:
    value = str(text).strip()
    if value in ("memory", "sqlite"):
        return value
    if value.startswith(("redis://", "rediss://", "unix://")):
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if value.startswith("unix://") or parts.hostname:
            return value
    raise ValueError(f"{text!r} is not memory, sqlite or a redis:// URL (redis://host:6379/0)")


def read_ca_file(path: object) -> str:
    """A PEM bundle ssl can load; returns the path."""
    import ssl

    text = str(path)
    try:
        ssl.create_default_context().load_verify_locations(text)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"cannot load CA certificates from {text}: {e}") from None
    return text


MODES = ("passthrough", "intercept")


def parse_mode(text: object) -> str:
    value = str(text).strip().lower()
    if value not in MODES:
        raise ValueError(f"{text!r} is not one of {', '.join(MODES)}")
    return value


REFUSALS = ("close", "status")


def parse_refusal(text: object) -> str:
    value = str(text).strip().lower()
    if value not in REFUSALS:
        raise ValueError(f"{text!r} is not one of {', '.join(REFUSALS)}")
    return value


def parse_share(text: object) -> float:
    """`20%` or `0.2` → 0.2."""
    value = str(text).strip()
    try:
        share = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a share (examples: 20%, 0.2)") from None
    if not 0 < share <= 1:
        raise ValueError(f"{text!r} must be more than 0% and at most 100%")
    return share


MIN_TOKEN_LENGTH = 16
MAX_TOKEN_FILE_BYTES = 4096  # a guessable token protects nothing


def read_token_file(path: str) -> str:
    token = read_small_text(path, MAX_TOKEN_FILE_BYTES).strip()
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise ValueError(
            f"{path} must hold one token of at least {MIN_TOKEN_LENGTH} characters, no spaces "
            "(e.g. `openssl rand -hex 32`)"
        )
    return token


def parse_admin_url(text: object) -> str:
    """`http(s)://host[:port][/prefix]`, or empty for no admin API."""
    value = str(text or "").strip()
    if value:
        from sidecar.synapse.admin import AdminEndpoint

        return str(AdminEndpoint.parse(value))
    return ""


def parse_log_level(text: object) -> str:
    level = str(text).strip().lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"{level!r} is not one of {', '.join(LOG_LEVELS)}")
    return level
