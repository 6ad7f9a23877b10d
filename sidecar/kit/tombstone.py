"""The decommissioning kit: what a retiring homeserver publishes so senders stop calling.

`tombstone-sidecar tombstone NAME` renders, from one `Tombstone`, the DNS records (TXT
`v=matrix;gone`, optionally SRV `.`) and nginx / Caddy snippets that answer `410 Gone`
with a Matrix error body and `Cache-Control: max-age` on `/_matrix/` and
`/.well-known/matrix/` (the paths `gone_http` counts). Operator text (contact, successor)
ends up inside a JSON string inside a config-file string, so every character that means
something to nginx (`$`, quotes, backslash) or Caddy (`{`, `}`, backtick) is written as a
JSON `\\uXXXX` escape: the body stays ASCII and byte-for-byte the same after each parser.
"""

from __future__ import annotations

import datetime
import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.judge import gone_http
from sidecar.judge.names import InvalidName, is_ip_literal, parse_authority
from sidecar.judge.signals import SRV_PREFIXES
from sidecar.judge.tombstone_txt import TOMBSTONE_FLAG, TOMBSTONE_VERSION

ERRCODE = "M_SERVER_DECOMMISSIONED"  # the code the sidecar's own answers carry (answers.py)
TXT_TEXT = f"v={TOMBSTONE_VERSION};{TOMBSTONE_FLAG}"  # exactly what synapse#3765 proposed
DAY = 86400
MAX_MAX_AGE = 30 * DAY  # MSC4188: a 410 on well-known halts discovery for at most 30 days
MIN_MAX_AGE = DAY  # MSC4188's shortest halt; less only makes senders ask more often
DEFAULT_MAX_AGE = MAX_MAX_AGE  # a tombstone is meant to last: ask senders to stay away longest
DEFAULT_DNS_TTL = 3600  # an hour: caches well, and a mistake is undone within the hour
MAX_NOTE_LENGTH = 300  # contact/successor: a line for people, not a document
# Characters nginx (`$` variables, quotes, `\` escapes) or Caddy (`{}` placeholders, `{$ENV}`,
# backtick quotes) would read into; JSON lets us write them as \uXXXX instead.
_CONFIG_SPECIAL = frozenset("$'\"\\`{};#")
PATHS = gone_http.TOMBSTONE_PATHS
_NOT_TEXT = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})  # controls, breaks, unassigned


class KitError(ValueError):
    """Bad input to the kit; `str()` is the one line the operator sees."""


@dataclass(frozen=True)
class Tombstone:
    """Everything the kit renders, validated."""

    name: str  # normalized server name (host only)
    port: int | None  # an explicit port in the server name: senders skip well-known and SRV
    date: datetime.date
    contact: str = ""
    successor: str = ""
    max_age: int = DEFAULT_MAX_AGE
    dns_ttl: int = DEFAULT_DNS_TTL
    srv: bool = False
    federation_hosts: tuple[str, ...] = ()  # delegated hosts: each gets its own TXT record
    notes: tuple[str, ...] = field(default=())  # what was adjusted, and why


def make(
    raw_name: str,
    *,
    date: str | None = None,
    contact: str = "",
    successor: str = "",
    max_age: float = DEFAULT_MAX_AGE,
    dns_ttl: float = DEFAULT_DNS_TTL,
    srv: bool = False,
    federation_hosts: Sequence[str] = (),
    today: datetime.date | None = None,
) -> Tombstone:
    """Validate the operator's input (KitError names the problem) and clamp max-age."""
    try:
        authority = parse_authority(raw_name, default_port=0)
    except InvalidName as e:
        raise KitError(f"NAME: {e}") from None
    if is_ip_literal(authority.host):
        raise KitError(f"NAME: {authority.host} is an IP literal; DNS tombstones need a name")
    hosts: list[str] = []
    for raw in federation_hosts:
        try:
            host = parse_authority(raw, default_port=0).host
        except InvalidName as e:
            raise KitError(f"--federation-host: {e}") from None
        if is_ip_literal(host):
            raise KitError(f"--federation-host: {host} is an IP literal; it cannot carry a TXT")
        if host != authority.host and host not in hosts:
            hosts.append(host)
    notes: list[str] = []
    seconds = int(max_age)
    if seconds > MAX_MAX_AGE:
        notes.append(
            f"--max-age {_days(seconds)} is longer than the 30 days MSC4188 allows; "
            "using 30d (senders would clamp it anyway)"
        )
        seconds = MAX_MAX_AGE
    elif seconds < MIN_MAX_AGE:
        notes.append(
            f"--max-age {seconds}s is shorter than MSC4188's 24 hours; using 1d "
            "(a shorter time only makes senders come back sooner)"
        )
        seconds = MIN_MAX_AGE
    return Tombstone(
        name=authority.host,
        port=authority.port or None,
        date=_parse_date(date, today),
        contact=_note("--contact", contact),
        successor=_note("--successor", successor),
        max_age=seconds,
        dns_ttl=int(dns_ttl),
        srv=srv,
        federation_hosts=tuple(hosts),
        notes=tuple(notes),
    )


def _parse_date(text: str | None, today: datetime.date | None) -> datetime.date:
    if text is None:
        return today or datetime.datetime.now(datetime.UTC).date()
    try:
        if len(text) != 10:
            raise ValueError
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise KitError(f"--date: {text[:40]!r} is not a date like 2026-11-27") from None


def _note(option: str, text: str) -> str:
    value = text.strip()
    if len(value) > MAX_NOTE_LENGTH:
        raise KitError(f"{option}: {len(value)} characters; keep it under {MAX_NOTE_LENGTH}")
    bad = next((c for c in value if unicodedata.category(c) in _NOT_TEXT), None)
    if bad is not None:
        raise KitError(f"{option}: contains the control character {bad!r}; give one line of text")
    return value


def _days(seconds: int) -> str:
    return f"{seconds // DAY}d" if seconds % DAY == 0 else f"{seconds}s"


# -- the HTTP answer -----------------------------------------------------------------------


def error_text(t: Tombstone) -> str:
    """The sentence a user sees when their server relays the error."""
    parts = [f"{t.name} was decommissioned on {t.date.isoformat()} and no longer federates."]
    if t.successor:
        parts.append(f"Successor: {t.successor}.")
    if t.contact:
        parts.append(f"Contact: {t.contact}.")
    return " ".join(parts)


def body(t: Tombstone) -> dict[str, Any]:
    """The Matrix error JSON: errcode and error, plus the same facts as fields for machines."""
    data: dict[str, Any] = {
        "errcode": ERRCODE,
        "error": error_text(t),
        "decommissioned": t.date.isoformat(),
    }
    if t.successor:
        data["successor"] = t.successor
    if t.contact:
        data["contact"] = t.contact
    return data


def body_json(t: Tombstone) -> str:
    """The body as one ASCII line in which no config-special character appears literally
    except the JSON structure itself (`{`, `}` and the `"` around keys and values)."""
    items = [f"{json.dumps(key)}:{_config_safe(value)}" for key, value in body(t).items()]
    return "{" + ",".join(items) + "}"


def _config_safe(value: str) -> str:
    """A JSON string with every non-ASCII and config-special character as \\uXXXX."""
    return '"' + "".join(_config_safe_char(c) for c in value) + '"'


def _config_safe_char(char: str) -> str:
    if not char.isascii():
        return json.dumps(char)[1:-1]  # \\uXXXX, a surrogate pair beyond the BMP
    if char in _CONFIG_SPECIAL or not char.isprintable():
        return f"\\u{ord(char):04x}"
    return char


def cache_control(t: Tombstone) -> str:
    return f"max-age={t.max_age}"


# -- DNS -----------------------------------------------------------------------------------


def dns_records(t: Tombstone) -> list[str]:
    """Zone-file lines: the TXT tombstone, and with --srv the SRV `.` record."""
    lines = [f'{host}. {t.dns_ttl} IN TXT "{TXT_TEXT}"' for host in (t.name, *t.federation_hosts)]
    if t.srv:
        lines.append(f"{SRV_PREFIXES[0]}.{t.name}. {t.dns_ttl} IN SRV 0 0 0 .")
    return lines


def render_dns(t: Tombstone) -> str:
    lines = [
        f"; tombstone for {t.name}: add to the zone of {t.name} (keep the domain registered)",
        f"; TXT {TXT_TEXT}: senders behind tombstone-sidecar stop before connecting",
    ]
    if t.federation_hosts:
        lines.append(
            f"; {', '.join(t.federation_hosts)}: senders that cached your delegation "
            "connect there directly; its own TXT stops them too"
        )
    if t.srv:
        lines.append(
            "; SRV target '.': RFC 2782 'decidedly not available'; delete any other "
            f"{SRV_PREFIXES[0]} and {SRV_PREFIXES[1]} records of {t.name}"
        )
    return "\n".join([*lines, *dns_records(t)]) + "\n"


# -- nginx ---------------------------------------------------------------------------------


def _nginx_quote(text: str) -> str:
    """A single-quoted nginx string. nginx unescapes \\' and \\\\ (and \\t \\r \\n), and
    expands $variables in `return` text: body_json has no `$`, `'` or `\\` literal but the
    backslashes of its \\u escapes, which are doubled here."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def render_nginx(t: Tombstone) -> str:
    """`location` blocks for the server block(s) of the server name and its federation port."""
    quoted = _nginx_quote(body_json(t))
    lines = [
        f"# tombstone for {t.name} (tombstone-sidecar tombstone): paste into every nginx",
        f"# server block that answers for {t.name} (443: well-known) and for its federation",
        "# address (8448, or the delegated host); remove the old /_matrix and",
        "# /.well-known/matrix locations there first.",
    ]
    for path in PATHS:
        lines += [
            f"location ^~ {path} {{",
            "    types { }",
            "    default_type application/json;",
            f'    add_header Cache-Control "{cache_control(t)}" always;',
            "    add_header Access-Control-Allow-Origin * always;",
            f"    return 410 {quoted};",
            "}",
        ]
    return "\n".join(lines) + "\n"


# -- Caddy ---------------------------------------------------------------------------------


def render_caddy(t: Tombstone) -> str:
    """A `handle` block for the site block(s) of the server name and its federation port.

    The body goes in backticks (no Caddyfile escapes at all; body_json holds no backtick)
    and holds no placeholder: its only `{ }` are the JSON object's own, around a key that
    begins with a quote, which Caddy's replacer leaves as it is.
    """
    matcher = " ".join(f"{path}*" for path in PATHS)
    lines = [
        f"# tombstone for {t.name} (tombstone-sidecar tombstone): paste into every Caddy",
        f"# site block that answers for {t.name} (443: well-known) and for its federation",
        "# address (8448, or the delegated host), before any reverse_proxy.",
        f"@tombstone path {matcher}",
        "handle @tombstone {",
        "\theader Content-Type application/json",
        f'\theader Cache-Control "{cache_control(t)}"',
        "\theader Access-Control-Allow-Origin *",
        f"\trespond `{body_json(t)}` 410",
        "}",
    ]
    return "\n".join(lines) + "\n"


# -- everything ----------------------------------------------------------------------------

PARTS = ("dns", "nginx", "caddy")
RENDER = {"dns": render_dns, "nginx": render_nginx, "caddy": render_caddy}


def as_dict(t: Tombstone) -> dict[str, Any]:
    """`--format json`: every part, and the facts behind them."""
    return {
        "name": t.name,
        "decommissioned": t.date.isoformat(),
        "max_age": t.max_age,
        "dns_ttl": t.dns_ttl,
        "federation_hosts": list(t.federation_hosts),
        "dns_records": dns_records(t),
        "status": gone_http.TOMBSTONE_STATUS,
        "paths": list(PATHS),
        "headers": {"Content-Type": "application/json", "Cache-Control": cache_control(t)},
        "body": body(t),
        "nginx": render_nginx(t),
        "caddy": render_caddy(t),
        "notes": list(t.notes),
    }


def render_text(t: Tombstone) -> str:
    """The whole kit for a person: each part under a heading, then how to confirm it."""
    port_note = ""
    if t.port is not None:
        port_note = (
            f"\n(The server name carries a port, {t.port}: senders skip well-known "
            "and SRV and go straight there; answer 410 on that port.)\n"
        )
    check = f"tombstone-sidecar check {t.name}{':' + str(t.port) if t.port else ''} --probe"
    sections = [
        f"Tombstone for {t.name}, decommissioned {t.date.isoformat()}.{port_note}",
        "== 1. DNS records ==",
        render_dns(t),
        f"== 2. nginx (410 Gone, Cache-Control {cache_control(t)} = {_days(t.max_age)}) ==",
        render_nginx(t),
        "== 3. Caddy (the same answer) ==",
        render_caddy(t),
        "== 4. Confirm what senders will conclude ==",
        f"{check}\n",
        "Keep the domain registered, the records published and the 410 answer up: a sender "
        f"that saw it stays away for {_days(t.max_age)} and then asks again.",
    ]
    return "\n".join(sections) + "\n"
