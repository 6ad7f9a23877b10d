"""Every option, declared once: CLI flags, `TOMBSTONE_*` env, YAML keys and mitmproxy options.

The table below is the single source. `tombstone-sidecar run` reads flags > env > YAML file
> default into raw strings; `mitmdump -s addons/tombstone.py` reads `--set tombstone_*`.
Both paths end in `Settings.from_raw`, which validates each value and names the option in
its error, so a bad value reads the same whichever way it came in.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from sidecar.config.files import read_credentials, read_small_text
from sidecar.dns.client import Nameserver
from sidecar.judge.names import (
    Authority,
    InvalidName,
    is_ip_literal,
    normalize_host,
    parse_authority,
)
from sidecar.judge.request_classes import DEFAULT_STATUS, parse_override
from sidecar.remote.addresses import IPNetwork, parse_network

ENV_PREFIX = "TOMBSTONE_"
MITM_PREFIX = "tombstone_"
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# No setting means more than ten years (the operator deny list's own lifetime); a longer
# one would put expiry times past what the stores read back (the year 9999) or Redis takes.
MAX_DURATION_SECONDS = 3650 * 86400
MAX_DENY_FILE_BYTES = 16 * 1024 * 1024  # a deny list larger than this is a mistake


class ConfigError(ValueError):
    """A bad option value; `str()` is the one line an operator sees."""

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"--{option.replace('_', '-')}: {problem}")
        self.option = option
        self.problem = problem

    def for_mitmproxy(self) -> str:
        """The same error named as mitmdump users spell the option: `tombstone_min_ttl`."""
        return f"{MITM_PREFIX}{self.option}: {self.problem}"


@dataclass(frozen=True)
class Option:
    """One option: its name (snake_case), how it reads, its default and its help."""

    name: str
    default: Any
    help: str
    metavar: str = ""
    repeatable: bool = False
    flag: bool = False  # true/false switch: --x / --no-x
    scope: str = "all"  # "all": CLI and mitmproxy; "cli": `tombstone-sidecar` only; "run": run only

    @property
    def cli(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def mitm(self) -> str:
        return MITM_PREFIX + self.name


OPTIONS: tuple[Option, ...] = (
    Option(
        "config",
        None,
        "YAML file with any of these options as keys (e.g. `min_ttl: 10m`).",
        "FILE",
        scope="cli",
    ),
    Option(
        "listen",
        "127.0.0.1:3128",
        "Proxy address; point HTTPS_PROXY at it. A non-loopback "
        "address makes this an open proxy: keep it on loopback in a sidecar.",
        "HOST:PORT",
        scope="run",
    ),
    Option(
        "mode",
        "passthrough",
        "`passthrough`: judge CONNECT targets and TLS SNI, never see plaintext, no CA. "
        "`intercept`: terminate TLS with the sidecar's own CA (in --state-dir; see "
        "`tombstone-sidecar ca`) and judge every request by its X-Matrix destination.",
        "MODE",
    ),
    Option(
        "answer",
        (),
        "Intercept mode: the status for a request class, CLASS=STATUS (classes: failover 502, "
        "user 410, send 410, well_known 410, other 502); repeatable.",
        "CLASS=STATUS",
        repeatable=True,
    ),
    Option(
        "ops_listen",
        "127.0.0.1:9480",
        "Ops HTTP address: /metrics, /healthz, /readyz, /v1/verdicts. Empty to disable.",
        "HOST:PORT",
    ),
    Option(
        "nameserver",
        (),
        "Resolver to ask (repeatable). Default: /etc/resolv.conf.",
        "IP[:PORT]",
        repeatable=True,
    ),
    Option(
        "dns_timeout",
        "5s",
        "Give up on one DNS query after this long; the request then passes (fail open).",
        "DURATION",
    ),
    Option(
        "dns_max_stale",
        "1h",
        "When DNS fails, keep dialling a live name's last addresses at most this long after "
        "their TTL ran out (RFC 8767); then fail as Synapse alone would.",
        "DURATION",
    ),
    Option("min_ttl", "5m", "Shortest time a DNS verdict is kept, whatever its TTL.", "DURATION"),
    Option(
        "max_ttl",
        "24h",
        "Longest time a DNS verdict is kept before it is checked again.",
        "DURATION",
    ),
    Option(
        "deny",
        (),
        "Treat this server name as gone (signal `operator`); repeatable.",
        "NAME",
        repeatable=True,
    ),
    Option(
        "deny_file", "", "File of server names to treat as gone, one per line, # comments.", "FILE"
    ),
    Option(
        "allow",
        (),
        "Never suppress this server name, whatever DNS says; repeatable.",
        "NAME",
        repeatable=True,
    ),
    Option(
        "allow_file",
        "",
        "File of server names never to suppress, one per line, # comments.",
        "FILE",
    ),
    Option(
        "allow_address",
        (),
        "Allow upstream addresses in this otherwise blocked range "
        "(loopback, RFC 1918, ...); repeatable.",
        "CIDR",
        repeatable=True,
    ),
    Option(
        "enforce",
        True,
        "Suppress traffic to gone servers. --no-enforce is shadow mode: "
        "count tombstone_would_suppress_total, forward everything.",
        flag=True,
    ),
    Option(
        "refusal",
        "close",
        "How a CONNECT to a gone server is refused: `close` (shut the connection without an "
        "answer: Synapse backs off the same and logs no CRITICAL traceback) or `status` "
        "(answer --suppress-status with a JSON body and X-Tombstone-Signal, for curl & co).",
        "close|status",
    ),
    Option(
        "suppress_status",
        "502",
        "HTTP status for a refused CONNECT with --refusal status, and for a plain-HTTP "
        "request to a gone server (Synapse backs off on 5xx).",
        "CODE",
    ),
    Option(
        "cache_size", "100000", "Most verdicts kept in memory (least recently used go first).", "N"
    ),
    Option(
        "store",
        "sqlite",
        "Where verdicts outlive the process: `sqlite` (a file in --state-dir, survives "
        "restarts), `redis://HOST:PORT/DB` (shared by every sidecar), or `memory`.",
        "STORE",
    ),
    Option(
        "state_dir",
        "",
        "Directory for the state file. Default: $XDG_STATE_HOME/tombstone-sidecar "
        "(~/.local/state/tombstone-sidecar); mount a volume here in a container.",
        "DIR",
    ),
    Option(
        "ops_token_file",
        "",
        "File holding the bearer token that ops API changes (PUT, DELETE) require; "
        "without it the API is read-only.",
        "FILE",
    ),
    Option(
        "probe",
        True,
        "Probe each new server name once per --probe-interval (GET /.well-known/matrix/server "
        "and /_matrix/federation/v1/version, in the background) to learn 410 Gone.",
        flag=True,
    ),
    Option("probe_interval", "1h", "At most one probe per server name this often.", "DURATION"),
    Option("probe_timeout", "10s", "Give up on one probe request after this long.", "DURATION"),
    Option("probe_concurrency", "8", "Probes running at once, at most.", "N"),
    Option(
        "gone_ttl",
        "24h",
        "How long a 410 verdict holds when the response has no Cache-Control/Expires.",
        "DURATION",
    ),
    Option(
        "min_gone_ttl",
        "24h",
        "Shortest time a 410 verdict holds (MSC4188: discovery halts at least 24 hours).",
        "DURATION",
    ),
    Option(
        "max_gone_ttl",
        "90d",
        "Longest time a 410 verdict holds (MSC4188: at most 90 days; domains change owners).",
        "DURATION",
    ),
    Option(
        "upstream_ca",
        "",
        "Extra CA bundle (PEM) trusted when the sidecar itself talks TLS to remote servers "
        "(probes), besides the system store: for tests and private federations.",
        "FILE",
    ),
    Option(
        "connect_timeout",
        "10s",
        "Give up dialling an upstream after this long (a blackholed address otherwise hangs "
        "for minutes); the failure feeds the unreachable breaker.",
        "DURATION",
    ),
    Option(
        "breaker_failures",
        "5",
        "Consecutive connect failures to one host:port that open its unreachable breaker.",
        "N",
    ),
    Option("breaker_min", "10m", "How long a newly opened breaker answers locally.", "DURATION"),
    Option(
        "breaker_max",
        "24h",
        "Longest a breaker stays open; the time doubles on each failed trial up to this.",
        "DURATION",
    ),
    Option(
        "breaker_max_share",
        "20%",
        "If more than this share of recently tried destinations fail, the fault is ours: "
        "open no new breakers.",
        "PERCENT",
    ),
    Option(
        "require_dnssec",
        False,
        "Count DNS tombstones only when the resolver validated them (AD bit); unsigned zones "
        "then never suppress. Needs a validating resolver.",
        flag=True,
    ),
    Option(
        "synapse_admin_url",
        "",
        "Synapse's base URL for its admin API (e.g. http://127.0.0.1:8008): a lifted verdict "
        "resets Synapse's backoff for the name; Synapse's destinations are polled to resume "
        "early. Needs --synapse-admin-token-file.",
        "URL",
    ),
    Option(
        "synapse_admin_token_file",
        "",
        "File holding a Synapse admin user's access token, for --synapse-admin-url.",
        "FILE",
    ),
    Option(
        "synapse_admin_poll",
        "30s",
        "How often Synapse's destinations are polled (paginated) for gone names it stopped "
        "backing off.",
        "DURATION",
    ),
    Option(
        "hold_reborn",
        False,
        "Keep suppressing a gone server that comes back with new signing keys until an "
        "operator lifts it (ops DELETE / `verdicts forget`).",
        flag=True,
    ),
    Option(
        "proxy_auth_file",
        "",
        "File of user:password lines; every proxy request must then carry matching Basic "
        "Proxy-Authorization. Required when --listen is not loopback.",
        "FILE",
    ),
    Option(
        "head_timeout",
        "10s",
        "Close a proxy connection whose first request head has not arrived complete (and "
        "authenticated, with --proxy-auth-file) within this long: idle and half-sent "
        "connections hold nothing for long.",
        "DURATION",
    ),
    Option(
        "max_head_size",
        "64k",
        "Largest first request head (request line and headers) a proxy client may send; "
        "a longer one is answered 431 and closed. Synapse's CONNECT is ~200 bytes.",
        "SIZE",
    ),
    Option(
        "max_pending_clients",
        "auto",
        "Most proxy connections waiting for their first admitted request at once; beyond it "
        "the oldest waiting one is closed. `auto`: a quarter of the open-file limit less "
        "128, between 8 and 1024, so authorised tunnels and the ops port keep descriptors.",
        "N|auto",
    ),
    Option(
        "allow_open_proxy",
        False,
        "Allow a non-loopback --listen without --proxy-auth-file (only behind a NetworkPolicy "
        "that admits nothing but the homeserver).",
        flag=True,
    ),
    Option(
        "reuse_port",
        False,
        "Let several sidecar processes listen on the same --listen port (SO_REUSEPORT; the "
        "kernel spreads connections). For a central proxy that needs more than one core; "
        "share verdicts with --store redis.",
        flag=True,
        scope="run",
    ),
    Option(
        "shutdown_grace",
        "20s",
        "On SIGTERM stop accepting, let open tunnels finish for up to this long, then exit 0.",
        "DURATION",
        scope="run",
    ),
    Option(
        "log_level", "info", "Sidecar log level: debug, info, warning, error.", "LEVEL", scope="run"
    ),
)
BY_NAME = {o.name: o for o in OPTIONS}
ADDON_OPTIONS = tuple(o for o in OPTIONS if o.scope == "all")
LOG_LEVELS = ("debug", "info", "warning", "error")


def open_proxy_problem(listen_host: str, settings: Settings) -> str | None:
    """Why listening on `listen_host` would open the proxy to anyone who reaches it, or
    None. The one rule for `run --listen` and for mitmdump's `--listen-host` (empty: every
    interface)."""
    host = listen_host.strip().strip("[]")
    try:
        loopback = host == "localhost" or (bool(host) and ipaddress.ip_address(host).is_loopback)
    except ValueError:
        loopback = False
    if loopback or settings.proxy_users is not None or settings.allow_open_proxy:
        return None
    where = host or "every interface"
    return (
        f"{where} is not a loopback address, so anyone who reaches it could use this proxy. "
        "Give --proxy-auth-file (and put the credentials in the homeserver's proxy URL), or "
        "--allow-open-proxy if a NetworkPolicy admits only the homeserver."
    )


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


class OperatorLists(NamedTuple):
    """What `Settings.read_lists` found: the merged lists, and how many names the deny
    file itself held (0 for an emptied file, which reload_lists confirms before taking)."""

    deny: frozenset[str]
    allow: frozenset[str]
    deny_file_names: int


@dataclass(frozen=True)
class Settings:
    """Validated options, typed; built only by `from_raw`."""

    listen: Authority
    ops_listen: Authority | None
    nameservers: tuple[Nameserver, ...]
    dns_timeout: float
    dns_max_stale: float
    min_ttl: float
    max_ttl: float
    deny: frozenset[str]
    allow: frozenset[str]
    allow_addresses: tuple[IPNetwork, ...]
    enforce: bool
    suppress_status: int
    refusal: str
    cache_size: int
    log_level: str
    deny_file: str
    allow_file: str
    deny_flags: frozenset[str]
    allow_flags: frozenset[str]
    store: str
    state_dir: str
    ops_token: str | None
    connect_timeout: float
    breaker_failures: int
    breaker_min: float
    breaker_max: float
    breaker_max_share: float
    require_dnssec: bool
    proxy_users: dict[str, str] | None
    allow_open_proxy: bool
    reuse_port: bool
    shutdown_grace: float
    probe: bool
    probe_interval: float
    probe_timeout: float
    probe_concurrency: int
    gone_ttl: float
    min_gone_ttl: float
    max_gone_ttl: float
    upstream_ca: str
    mode: str
    answer_status: dict[str, int]
    synapse_admin_url: str = ""
    synapse_admin_token: str | None = None
    synapse_admin_poll: float = 30.0
    hold_reborn: bool = False
    head_timeout: float = 10.0
    max_head_size: int = 64 * 1024
    max_pending_clients: int = 0  # 0: auto, from the open-file limit

    def read_lists(self) -> OperatorLists:
        """Deny and allow lists: the flags plus the files as they are now (ValueError if bad).
        Blocking file I/O and parsing: call it off the event loop."""
        deny = set(self.deny_flags)
        allow = set(self.allow_flags)
        in_file = 0
        if self.deny_file:
            listed = read_name_file(self.deny_file)
            in_file = len(listed)
            deny.update(listed)
        if self.allow_file:
            allow.update(read_name_file(self.allow_file))
        return OperatorLists(frozenset(deny), frozenset(allow), in_file)

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any]) -> Settings:
        """Validate raw values (strings, lists, bools) keyed by option name."""

        def get(name: str) -> Any:
            return _plain(BY_NAME[name], raw.get(name, BY_NAME[name].default))

        def check(name: str, parse: Callable[[Any], Any]) -> Any:
            try:
                return parse(get(name))
            except ValueError as e:
                raise ConfigError(name, str(e)) from None

        def each(name: str, parse: Callable[[str], Any]) -> tuple[Any, ...]:
            values = _as_list(get(name))
            try:
                return tuple(parse(str(v)) for v in values)
            except ValueError as e:
                raise ConfigError(name, str(e)) from None

        min_ttl = check("min_ttl", parse_duration)
        max_ttl = check("max_ttl", parse_duration)
        if max_ttl < min_ttl:
            raise ConfigError(
                "max_ttl", f"{get('max_ttl')} is shorter than --min-ttl {get('min_ttl')}"
            )
        deny_file = str(get("deny_file") or "")
        allow_file = str(get("allow_file") or "")
        deny_flags = frozenset(each("deny", parse_name))
        allow_flags = frozenset(each("allow", parse_name))
        denied = set(deny_flags)
        allowed = set(allow_flags)
        if deny_file:
            denied.update(check("deny_file", read_name_file))
        if allow_file:
            allowed.update(check("allow_file", read_name_file))
        token_file = str(get("ops_token_file") or "")
        auth_file = str(get("proxy_auth_file") or "")
        min_gone = check("min_gone_ttl", parse_duration)
        max_gone = check("max_gone_ttl", parse_duration)
        if max_gone < min_gone:
            raise ConfigError(
                "max_gone_ttl", f"{get('max_gone_ttl')} is shorter than --min-gone-ttl"
            )
        breaker_min = check("breaker_min", parse_duration)
        breaker_max = check("breaker_max", parse_duration)
        if breaker_max < breaker_min:
            raise ConfigError("breaker_max", f"{get('breaker_max')} is shorter than --breaker-min")
        level = str(get("log_level")).strip().lower()
        if level not in LOG_LEVELS:
            raise ConfigError("log_level", f"{level!r} is not one of {', '.join(LOG_LEVELS)}")
        ops = str(get("ops_listen") or "").strip()
        admin_url = check("synapse_admin_url", parse_admin_url)
        admin_token_file = str(get("synapse_admin_token_file") or "")
        if admin_url and not admin_token_file:
            raise ConfigError("synapse_admin_url", "needs --synapse-admin-token-file too")
        if admin_token_file and not admin_url:
            raise ConfigError("synapse_admin_token_file", "needs --synapse-admin-url too")
        return cls(
            listen=check("listen", parse_listen),
            ops_listen=check("ops_listen", parse_listen) if ops else None,
            nameservers=each("nameserver", parse_nameserver),
            dns_timeout=check("dns_timeout", parse_duration),
            dns_max_stale=check("dns_max_stale", parse_duration),
            min_ttl=min_ttl,
            max_ttl=max_ttl,
            deny=frozenset(denied),
            allow=frozenset(allowed),
            allow_addresses=each("allow_address", parse_network),
            enforce=check("enforce", parse_bool),
            suppress_status=check("suppress_status", lambda v: parse_int(v, 400, 599)),
            refusal=check("refusal", parse_refusal),
            cache_size=check("cache_size", lambda v: parse_int(v, 1, 100_000_000)),
            log_level=level,
            deny_file=deny_file,
            allow_file=allow_file,
            deny_flags=deny_flags,
            allow_flags=allow_flags,
            store=check("store", parse_store),
            state_dir=str(get("state_dir") or ""),
            ops_token=check("ops_token_file", read_token_file) if token_file else None,
            connect_timeout=check("connect_timeout", parse_duration),
            breaker_failures=check("breaker_failures", lambda v: parse_int(v, 1, 1000)),
            breaker_min=breaker_min,
            breaker_max=breaker_max,
            breaker_max_share=check("breaker_max_share", parse_share),
            require_dnssec=check("require_dnssec", parse_bool),
            proxy_users=check("proxy_auth_file", read_credentials) if auth_file else None,
            allow_open_proxy=check("allow_open_proxy", parse_bool),
            reuse_port=check("reuse_port", parse_bool),
            shutdown_grace=check("shutdown_grace", parse_duration),
            probe=check("probe", parse_bool),
            probe_interval=check("probe_interval", parse_duration),
            probe_timeout=check("probe_timeout", parse_duration),
            probe_concurrency=check("probe_concurrency", lambda v: parse_int(v, 1, 1000)),
            gone_ttl=check("gone_ttl", parse_duration),
            min_gone_ttl=min_gone,
            max_gone_ttl=max_gone,
            upstream_ca=check("upstream_ca", read_ca_file) if get("upstream_ca") else "",
            mode=check("mode", parse_mode),
            answer_status={**DEFAULT_STATUS, **dict(each("answer", parse_override))},
            synapse_admin_url=admin_url,
            synapse_admin_token=(
                check("synapse_admin_token_file", read_token_file) if admin_token_file else None
            ),
            synapse_admin_poll=check("synapse_admin_poll", parse_duration),
            hold_reborn=check("hold_reborn", parse_bool),
            head_timeout=check("head_timeout", parse_duration),
            max_head_size=check("max_head_size", lambda v: parse_size(v, 1024, 16 * 1024 * 1024)),
            max_pending_clients=check("max_pending_clients", parse_pending),
        )


def _scalar(option: Option, value: object) -> str | bool:
    """One config value as the parsers take it; ConfigError for anything else."""
    if isinstance(value, bool):
        if option.flag:
            return value
        return "true" if value else "false"
    if isinstance(value, int | float):
        try:
            return str(value)  # YAML `max_ttl: 3600` means the same as "3600"
        except ValueError:  # an int of thousands of digits
            raise ConfigError(option.name, "number too large") from None
    if isinstance(value, str):
        return value
    if value is None:  # YAML `key:` with nothing after it
        if option.flag:
            raise ConfigError(option.name, "needs true or false")
        return ""
    raise ConfigError(option.name, f"expected one value, got a {type(value).__name__}")


def _plain(option: Option, value: object) -> Any:
    """Flag, env and YAML values reduced to str/bool (lists of them for repeatables)."""
    if option.repeatable:
        if value is None or isinstance(value, str):
            return value or ""
        if isinstance(value, list | tuple):
            return [_scalar(option, item) for item in value]
        return [_scalar(option, value)]
    return _scalar(option, value)


def _as_list(values: object) -> list[object]:
    """Repeatable values come as lists (flags, YAML, mitmproxy) or one string (env, commas)."""
    if values is None:
        return []
    if isinstance(values, str):
        return [v for v in values.replace(",", " ").split() if v]
    if isinstance(values, Sequence):
        return list(values)
    return [values]


def load_config_file(path: str) -> dict[str, Any]:
    """Read the YAML config; unknown keys are errors (a typo must not silently do nothing)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("config", f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError("config", f"{path} is not UTF-8 text: {e}") from None
    try:
        data = yaml.safe_load(text)
    except (ValueError, KeyError, AttributeError, TypeError, RecursionError) as e:
        # PyYAML's constructors raise these for values like `!!int abc` or `2001-02-30`.
        raise ConfigError("config", f"{path} is not valid YAML: {str(e)[:200]}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            "config", f"{path}{where} is not valid YAML: {getattr(e, 'problem', e)}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must be a mapping of option: value")
    result: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in BY_NAME or name == "config":
            raise ConfigError("config", f"{path}: unknown option {key!r}")
        if name in result:
            raise ConfigError("config", f"{path}: {key!r} is given twice (as - and _ spellings)")
        result[name] = value
    return result


def gather_raw(
    flags: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Merge one command's sources: flag > env > config file > default."""
    env = os.environ if environ is None else environ
    config_path = flags.get("config") or env.get(BY_NAME["config"].env)
    from_file = load_config_file(config_path) if config_path else {}
    raw: dict[str, Any] = {}
    for option in OPTIONS:
        if flags.get(option.name) is not None:
            raw[option.name] = flags[option.name]
        elif option.env in env:
            raw[option.name] = env[option.env]
        elif option.name in from_file:
            raw[option.name] = from_file[option.name]
    return raw
