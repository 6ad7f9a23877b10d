"""Every option, declared once, and the typed `Settings` they validate into.

One `Option` row says all there is about an option: its name, parser, default, help, which
subcommands use it, and so its flag (`--min-ttl`), variable (`TOMBSTONE_MIN_TTL`), YAML key
(`min_ttl`) and mitmproxy option (`tombstone_min_ttl`). The CLI's argparse flags, the
environment and config-file readers (`sources.py`) and the mitmdump addon's loader are all
derived from the table. `Settings.from_raw` validates raw values with the table's parsers
and names where a bad value came from, so it reads the same whichever way it came in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple, NoReturn

from sidecar.config.files import read_credentials
from sidecar.config.values import (
    parse_admin_url,
    parse_bool,
    parse_duration,
    parse_int,
    parse_listen,
    parse_log_level,
    parse_mode,
    parse_name,
    parse_nameserver,
    parse_pending,
    parse_refusal,
    parse_share,
    parse_size,
    parse_store,
    read_ca_file,
    read_name_file,
    read_token_file,
)
from sidecar.dns.client import Nameserver
from sidecar.judge.breaker import BreakerSettings
from sidecar.judge.names import Authority
from sidecar.judge.request_classes import DEFAULT_STATUS, parse_override
from sidecar.judge.ttl import TtlBounds
from sidecar.remote.addresses import IPNetwork, parse_network
from sidecar.remote.probe import ProbeSettings

ENV_PREFIX = "TOMBSTONE_"
MITM_PREFIX = "tombstone_"

# The subcommands that read options from the table (`tombstone`, the kit, reads none: it
# prints what a retiring server publishes and takes only its own arguments).
RUN = frozenset({"run"})
CHECK = frozenset({"check"})
VERDICTS = frozenset({"verdicts"})
CA = frozenset({"ca"})
ALL_COMMANDS = RUN | CHECK | VERDICTS | CA


class ConfigError(ValueError):
    """A bad option value; `str()` is the one line an operator sees, starting with where the
    value came from: `--min-ttl: ...`, `TOMBSTONE_MIN_TTL: ...`, `/etc/x.yaml line 7: min_ttl:
    ...` or, under mitmdump, `tombstone_min_ttl: ...`. `option` is "" when no option is named
    (an unknown `TOMBSTONE_*` variable)."""

    def __init__(self, option: str, problem: str, where: str = "") -> None:
        self.option = option
        self.problem = problem
        self.where = where or "--" + option.replace("_", "-")
        super().__init__(f"{self.where}: {problem}")


@dataclass(frozen=True)
class Source:
    """Where one raw value came from, so that an error names the place to fix it."""

    kind: str  # "flag", "env", "file" or "mitmproxy"
    path: str = ""  # the config file
    line: int | None = None  # its line (1-based) where the key is
    key: str = ""  # the key as written there (`min-ttl` or `min_ttl`)

    def spelled(self, option: Option) -> str:
        """The option as the operator spelled it at this source."""
        if self.kind == "env":
            return option.env
        if self.kind == "file":
            return self.key or option.yaml
        if self.kind == "mitmproxy":
            return option.mitm
        return option.cli

    def label(self, option: Option) -> str:
        """The start of an error about this value: `/etc/x.yaml line 7: min_ttl`."""
        if self.kind == "file":
            return f"{self.where()}: {self.spelled(option)}"
        return self.spelled(option)

    def mention(self, option: Option, value: object) -> str:
        """The value inside a sentence about another option: `min_ttl 1h (/x.yaml line 2)`."""
        said = f"{self.spelled(option)} {value}".rstrip()
        return f"{said} ({self.where()})" if self.kind == "file" else said

    def where(self) -> str:
        return f"{self.path} line {self.line}" if self.line else self.path


FLAG = Source("flag")
ENV = Source("env")
MITMPROXY = Source("mitmproxy")


class RawOptions(dict[str, Any]):
    """Raw values (strings, lists, bools) by option name, and where each came from.

    A value without a recorded source (and every default) is spelled as `fallback` spells
    it: as a flag for the CLI, as `tombstone_*` for the mitmdump addon."""

    def __init__(
        self,
        values: Mapping[str, Any] | None = None,
        sources: Mapping[str, Source] | None = None,
        fallback: Source = FLAG,
    ) -> None:
        super().__init__(values or {})
        self.sources = dict(sources or {})
        self.fallback = fallback

    def source(self, name: str) -> Source:
        return self.sources.get(name, self.fallback)

    def label(self, name: str) -> str:
        """How an error about this option's value starts: `--listen`, `TOMBSTONE_LISTEN`."""
        return self.source(name).label(BY_NAME[name])


@dataclass(frozen=True)
class Option:
    """One option, declared once: how it reads, its default, its help, who uses it."""

    name: str
    default: Any
    help: str
    metavar: str = ""
    # One value (one item of a repeatable option) in, the typed value out; ValueError if bad.
    parse: Callable[[Any], Any] = str
    uses: frozenset[str] = field(default=RUN)  # the subcommands that read it
    repeatable: bool = False
    flag: bool = False  # true/false switch: --x / --no-x
    mitmproxy: bool = True  # also a `--set tombstone_<name>` option of the mitmdump addon

    @property
    def cli(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def yaml(self) -> str:
        """The config-file key (`min-ttl` is read as the same key)."""
        return self.name

    @property
    def mitm(self) -> str:
        return MITM_PREFIX + self.name


def _whole(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        return parse_int(value, low, high)

    return parse


def _bytes(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        return parse_size(value, low, high)

    return parse


def _unless_empty(parse: Callable[[str], Any], empty: Any) -> Callable[[Any], Any]:
    """For a file option, whose empty value means "no file"."""

    def parse_given(value: Any) -> Any:
        path = str(value or "")
        return parse(path) if path else empty

    return parse_given


def _listen_or_none(value: Any) -> Authority | None:
    """`--ops-listen ''` turns the ops listener off."""
    text = str(value or "").strip()
    return parse_listen(text) if text else None


OPTIONS: tuple[Option, ...] = (
    Option(
        "config",
        None,
        "YAML file with any of these options as keys (e.g. `min_ttl: 10m`).",
        "FILE",
        parse=str,
        uses=ALL_COMMANDS,
        mitmproxy=False,
    ),
    Option(
        "listen",
        "127.0.0.1:3128",
        "Proxy address; point HTTPS_PROXY at it. A non-loopback address makes this an open "
        "proxy: keep it on loopback in a sidecar.",
        "HOST:PORT",
        parse=parse_listen,
        uses=RUN,
        mitmproxy=False,
    ),
    Option(
        "mode",
        "passthrough",
        "`passthrough`: judge CONNECT targets and TLS SNI, never see plaintext, no CA. "
        "`intercept`: terminate TLS with the sidecar's own CA (in --state-dir; see "
        "`tombstone-sidecar ca`) and judge every request by its X-Matrix destination.",
        "MODE",
        parse=parse_mode,
        uses=RUN,
    ),
    Option(
        "answer",
        (),
        "Intercept mode: the status for a request class, CLASS=STATUS (classes: failover 502,"
        " user 410, send 410, well_known 410, other 502); repeatable.",
        "CLASS=STATUS",
        parse=parse_override,
        uses=RUN,
        repeatable=True,
    ),
    Option(
        "ops_listen",
        "127.0.0.1:9480",
        "Ops HTTP address: /metrics, /healthz, /readyz, /v1/verdicts. Empty to disable.",
        "HOST:PORT",
        parse=_listen_or_none,
        uses=RUN | VERDICTS,
    ),
    Option(
        "nameserver",
        (),
        "Resolver to ask (repeatable). Default: /etc/resolv.conf.",
        "IP[:PORT]",
        parse=parse_nameserver,
        uses=RUN | CHECK,
        repeatable=True,
    ),
    Option(
        "dns_timeout",
        "5s",
        "Give up on one DNS query after this long; the request then passes (fail open).",
        "DURATION",
        parse=parse_duration,
        uses=RUN | CHECK,
    ),
    Option(
        "dns_max_stale",
        "1h",
        "When DNS fails, keep dialling a live name's last addresses at most this long after "
        "their TTL ran out (RFC 8767); then fail as Synapse alone would.",
        "DURATION",
        parse=parse_duration,
        uses=RUN,
    ),
    Option(
        "min_ttl",
        "5m",
        "Shortest time a DNS verdict is kept, whatever its TTL.",
        "DURATION",
        parse=parse_duration,
        uses=RUN | CHECK,
    ),
    Option(
        "max_ttl",
        "24h",
        "Longest time a DNS verdict is kept before it is checked again.",
        "DURATION",
        parse=parse_duration,
        uses=RUN | CHECK,
    ),
    Option(
        "deny",
        (),
        "Treat this server name as gone (signal `operator`); repeatable.",
        "NAME",
        parse=parse_name,
        uses=RUN | CHECK,
        repeatable=True,
    ),
    Option(
        "deny_file",
        "",
        "File of server names to treat as gone, one per line, # comments.",
        "FILE",
        parse=_unless_empty(read_name_file, ()),
        uses=RUN | CHECK,
    ),
    Option(
        "allow",
        (),
        "Never suppress this server name, whatever DNS says; repeatable.",
        "NAME",
        parse=parse_name,
        uses=RUN | CHECK,
        repeatable=True,
    ),
    Option(
        "allow_file",
        "",
        "File of server names never to suppress, one per line, # comments.",
        "FILE",
        parse=_unless_empty(read_name_file, ()),
        uses=RUN | CHECK,
    ),
    Option(
        "allow_address",
        (),
        "Allow upstream addresses in this otherwise blocked range (loopback, RFC 1918, ...); "
        "repeatable.",
        "CIDR",
        parse=parse_network,
        uses=RUN | CHECK,
        repeatable=True,
    ),
    Option(
        "enforce",
        True,
        "Suppress traffic to gone servers. --no-enforce is shadow mode: count "
        "tombstone_would_suppress_total, forward everything.",
        parse=parse_bool,
        uses=RUN,
        flag=True,
    ),
    Option(
        "refusal",
        "close",
        "How a CONNECT to a gone server is refused, and one that cannot be completed (every "
        "address blocked, none, the dial failed): `close` (shut the connection without a "
        "status line, as a failed connection looks without a proxy: Synapse backs off the "
        "same and logs no CRITICAL traceback) or `status` (answer --suppress-status, or 403 / "
        "502 when not gone, with a JSON body and X-Tombstone-Signal, for curl & co).",
        "close|status",
        parse=parse_refusal,
        uses=RUN,
    ),
    Option(
        "suppress_status",
        "502",
        "HTTP status for a refused CONNECT with --refusal status, and for a plain-HTTP "
        "request to a gone server (Synapse backs off on 5xx).",
        "CODE",
        parse=_whole(400, 599),
        uses=RUN,
    ),
    Option(
        "cache_size",
        "100000",
        "Most verdicts kept in memory (least recently used go first).",
        "N",
        parse=_whole(1, 100_000_000),
        uses=RUN,
    ),
    Option(
        "store",
        "sqlite",
        "Where verdicts outlive the process: `sqlite` (a file in --state-dir, survives "
        "restarts), `redis://HOST:PORT/DB` (shared by every sidecar), or `memory`.",
        "STORE",
        parse=parse_store,
        uses=RUN,
    ),
    Option(
        "state_dir",
        "",
        "Directory for the state file. Default: $XDG_STATE_HOME/tombstone-sidecar "
        "(~/.local/state/tombstone-sidecar); mount a volume here in a container.",
        "DIR",
        parse=str,
        uses=RUN | CA,
    ),
    Option(
        "ops_token_file",
        "",
        "File holding the bearer token that ops API changes (PUT, DELETE) require; without it"
        " the API is read-only.",
        "FILE",
        parse=_unless_empty(read_token_file, None),
        uses=RUN | VERDICTS,
    ),
    Option(
        "probe",
        True,
        "Pass-through: probe each new server name once per --probe-interval (its well-known "
        "and /_matrix/key/v2/server where Synapse would ask, in the background) to "
        "learn 410 Gone; intercept mode reads Synapse's own responses instead. An expiring "
        "410 is re-checked this way in both modes.",
        parse=parse_bool,
        uses=RUN,
        flag=True,
    ),
    Option(
        "probe_interval",
        "1h",
        "At most one probe per server name this often.",
        "DURATION",
        parse=parse_duration,
        uses=RUN,
    ),
    Option(
        "probe_timeout",
        "10s",
        "Give up on one probe request after this long.",
        "DURATION",
        parse=parse_duration,
        uses=RUN | CHECK,
    ),
    Option(
        "probe_concurrency",
        "8",
        "Probes running at once, at most.",
        "N",
        parse=_whole(1, 1000),
        uses=RUN,
    ),
    Option(
        "prejudge_room",
        True,
        "Intercept mode: when a send_join answer passes, judge the servers it names in the "
        "background (DNS only, a few at a time), so the fan-out after a join meets cached "
        "verdicts. The answer is forwarded unchanged and at once.",
        parse=parse_bool,
        uses=RUN,
        flag=True,
    ),
    Option(
        "gone_ttl",
        "24h",
        "How long a 410 verdict holds when the response has no Cache-Control/Expires.",
        "DURATION",
        parse=parse_duration,
        uses=RUN | CHECK,
    ),
    Option(
        "min_gone_ttl",
        "24h",
        "Shortest time a 410 verdict holds (MSC4188: discovery halts at least 24 hours).",
        "DURATION",
        parse=parse_duration,
        uses=RUN | CHECK,
    ),
    Option(
        "max_gone_ttl",
        "90d",
        "Longest time a 410 verdict holds (MSC4188: at most 90 days; domains change owners).",
        "DURATION",
        parse=parse_duration,
        uses=RUN | CHECK,
    ),
    Option(
        "upstream_ca",
        "",
        "Extra CA bundle (PEM) trusted when the sidecar itself talks TLS to remote servers "
        "(probes), besides the system store: for tests and private federations.",
        "FILE",
        parse=_unless_empty(read_ca_file, ""),
        uses=RUN | CHECK,
    ),
    Option(
        "connect_timeout",
        "30s",
        "Give up dialling an upstream after this long (a blackholed address otherwise hangs "
        "for minutes); the failure feeds the unreachable breaker. 30s is Synapse's own "
        "(Twisted's HostnameEndpoint): a shorter one makes Synapse retry a dead server sooner "
        "than it would alone.",
        "DURATION",
        parse=parse_duration,
        uses=RUN,
    ),
    Option(
        "breaker_failures",
        "5",
        "Consecutive connect failures to one host:port that open its unreachable breaker.",
        "N",
        parse=_whole(1, 1000),
        uses=RUN,
    ),
    Option(
        "breaker_min",
        "10m",
        "How long a newly opened breaker answers locally.",
        "DURATION",
        parse=parse_duration,
        uses=RUN,
    ),
    Option(
        "breaker_max",
        "24h",
        "Longest a breaker stays open; the time doubles on each failed trial up to this.",
        "DURATION",
        parse=parse_duration,
        uses=RUN,
    ),
    Option(
        "breaker_max_share",
        "20%",
        "If more than this share of recently tried destinations fail, the fault is ours: open"
        " no new breakers.",
        "PERCENT",
        parse=parse_share,
        uses=RUN,
    ),
    Option(
        "require_dnssec",
        False,
        "Count DNS tombstones only when the resolver validated them (AD bit); unsigned zones "
        "then never suppress. Needs a validating resolver.",
        parse=parse_bool,
        uses=RUN | CHECK,
        flag=True,
    ),
    Option(
        "synapse_admin_url",
        "",
        "Synapse's base URL for its admin API (e.g. http://127.0.0.1:8008): a lifted verdict "
        "resets Synapse's backoff for the name; Synapse's destinations are polled to resume "
        "early. Needs --synapse-admin-token-file.",
        "URL",
        parse=parse_admin_url,
        uses=RUN | VERDICTS,
    ),
    Option(
        "synapse_admin_token_file",
        "",
        "File holding a Synapse admin user's access token, for --synapse-admin-url.",
        "FILE",
        parse=_unless_empty(read_token_file, None),
        uses=RUN | VERDICTS,
    ),
    Option(
        "synapse_admin_poll",
        "30s",
        "How often Synapse's destinations are polled (paginated) for gone names it stopped "
        "backing off.",
        "DURATION",
        parse=parse_duration,
        uses=RUN,
    ),
    Option(
        "hold_reborn",
        False,
        "Keep suppressing a gone server that comes back with new signing keys until an "
        "operator lifts it (ops DELETE / `verdicts forget`).",
        parse=parse_bool,
        uses=RUN,
        flag=True,
    ),
    Option(
        "proxy_auth_file",
        "",
        "File of user:password lines; every proxy request must then carry matching Basic "
        "Proxy-Authorization. Required when --listen is not loopback.",
        "FILE",
        parse=_unless_empty(read_credentials, None),
        uses=RUN,
    ),
    Option(
        "head_timeout",
        "10s",
        "Close a proxy connection whose first request head has not arrived complete (and "
        "authenticated, with --proxy-auth-file) within this long: idle and half-sent "
        "connections hold nothing for long.",
        "DURATION",
        parse=parse_duration,
        uses=RUN,
    ),
    Option(
        "max_head_size",
        "64k",
        "Largest first request head (request line and headers) a proxy client may send; a "
        "longer one is answered 431 and closed. Synapse's CONNECT is ~200 bytes.",
        "SIZE",
        parse=_bytes(1024, 16 * 1024 * 1024),
        uses=RUN,
    ),
    Option(
        "max_pending_clients",
        "auto",
        "Most proxy connections waiting for their first admitted request at once; beyond it "
        "the oldest waiting one is closed. `auto`: a quarter of the open-file limit less 128,"
        " between 8 and 1024, so authorised tunnels and the ops port keep descriptors.",
        "N|auto",
        parse=parse_pending,
        uses=RUN,
    ),
    Option(
        "allow_open_proxy",
        False,
        "Allow a non-loopback --listen without --proxy-auth-file (only behind a NetworkPolicy"
        " that admits nothing but the homeserver).",
        parse=parse_bool,
        uses=RUN,
        flag=True,
    ),
    Option(
        "reuse_port",
        False,
        "Let several sidecar processes listen on the same --listen port (SO_REUSEPORT; the "
        "kernel spreads connections). For a central proxy that needs more than one core; "
        "share verdicts with --store redis.",
        parse=parse_bool,
        uses=RUN,
        flag=True,
        mitmproxy=False,
    ),
    Option(
        "shutdown_grace",
        "20s",
        "On SIGTERM stop accepting, let open tunnels finish for up to this long, then exit 0.",
        "DURATION",
        parse=parse_duration,
        uses=RUN,
        mitmproxy=False,
    ),
    Option(
        "log_level",
        "info",
        "Sidecar log level: debug, info, warning, error.",
        "LEVEL",
        parse=parse_log_level,
        uses=RUN,
        mitmproxy=False,
    ),
)
BY_NAME = {o.name: o for o in OPTIONS}
ADDON_OPTIONS = tuple(o for o in OPTIONS if o.mitmproxy)


def options_for(command: str) -> tuple[Option, ...]:
    """The options `command` reads, in table order (none for a command not in the table)."""
    return tuple(o for o in OPTIONS if command in o.uses)


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
    prejudge_room: bool = True

    # -- sections: what one component takes, as it takes it ------------------------------

    @cached_property
    def verdict_ttl(self) -> TtlBounds:
        """`--min-ttl`..`--max-ttl`: the lifetime of a verdict judged from DNS."""
        return TtlBounds(self.min_ttl, self.max_ttl)

    @cached_property
    def gone_lifetime(self) -> TtlBounds:
        """`--min-gone-ttl`..`--max-gone-ttl`, `--gone-ttl` when a 410 says nothing."""
        return TtlBounds(self.min_gone_ttl, self.max_gone_ttl, default=self.gone_ttl)

    @cached_property
    def breaker(self) -> BreakerSettings:
        """The unreachable breaker's `--breaker-*` options."""
        return BreakerSettings(
            self.breaker_failures, self.breaker_min, self.breaker_max, self.breaker_max_share
        )

    @cached_property
    def probing(self) -> ProbeSettings:
        """The 410 probes' `--probe-*` options, the 410 lifetimes and `--upstream-ca`."""
        return ProbeSettings(
            timeout=self.probe_timeout,
            concurrency=self.probe_concurrency,
            interval=self.probe_interval,
            ttl=self.gone_lifetime,
            ca_file=self.upstream_ca or None,
        )

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
    def from_raw(cls, raw: Mapping[str, Any], command: str | None = None) -> Settings:
        """Validate raw values (strings, lists, bools) keyed by option name.

        With `command`, only the options that command uses are read and validated; every
        other field keeps its default (so `verdicts` never opens the deny file). A
        `RawOptions` knows where each value came from, and errors say so."""
        given = raw if isinstance(raw, RawOptions) else RawOptions(raw)
        v = _Reader(given, options_for(command) if command is not None else OPTIONS)
        min_ttl, max_ttl = v["min_ttl"], v["max_ttl"]
        if max_ttl < min_ttl:
            v.fail("max_ttl", f"{v.plain('max_ttl')} is shorter than {v.mention('min_ttl')}")
        min_gone, max_gone = v["min_gone_ttl"], v["max_gone_ttl"]
        if max_gone < min_gone:
            v.fail(
                "max_gone_ttl",
                f"{v.plain('max_gone_ttl')} is shorter than "
                f"{v.mention('min_gone_ttl', value=False)}",
            )
        breaker_min, breaker_max = v["breaker_min"], v["breaker_max"]
        if breaker_max < breaker_min:
            v.fail(
                "breaker_max",
                f"{v.plain('breaker_max')} is shorter than {v.mention('breaker_min', value=False)}",
            )
        admin_url, admin_token_file = v["synapse_admin_url"], v.text("synapse_admin_token_file")
        if admin_url and not admin_token_file:
            v.fail("synapse_admin_url", f"needs {v.mention('synapse_admin_token_file', False)} too")
        if admin_token_file and not admin_url:
            v.fail("synapse_admin_token_file", f"needs {v.mention('synapse_admin_url', False)} too")
        deny_flags, allow_flags = frozenset(v["deny"]), frozenset(v["allow"])
        return cls(
            listen=v["listen"],
            ops_listen=v["ops_listen"],
            nameservers=v["nameserver"],
            dns_timeout=v["dns_timeout"],
            dns_max_stale=v["dns_max_stale"],
            min_ttl=min_ttl,
            max_ttl=max_ttl,
            deny=deny_flags.union(v["deny_file"]),
            allow=allow_flags.union(v["allow_file"]),
            allow_addresses=v["allow_address"],
            enforce=v["enforce"],
            suppress_status=v["suppress_status"],
            refusal=v["refusal"],
            cache_size=v["cache_size"],
            log_level=v["log_level"],
            deny_file=v.text("deny_file"),
            allow_file=v.text("allow_file"),
            deny_flags=deny_flags,
            allow_flags=allow_flags,
            store=v["store"],
            state_dir=v.text("state_dir"),
            ops_token=v["ops_token_file"],
            connect_timeout=v["connect_timeout"],
            breaker_failures=v["breaker_failures"],
            breaker_min=breaker_min,
            breaker_max=breaker_max,
            breaker_max_share=v["breaker_max_share"],
            require_dnssec=v["require_dnssec"],
            proxy_users=v["proxy_auth_file"],
            allow_open_proxy=v["allow_open_proxy"],
            reuse_port=v["reuse_port"],
            shutdown_grace=v["shutdown_grace"],
            probe=v["probe"],
            probe_interval=v["probe_interval"],
            probe_timeout=v["probe_timeout"],
            probe_concurrency=v["probe_concurrency"],
            gone_ttl=v["gone_ttl"],
            min_gone_ttl=min_gone,
            max_gone_ttl=max_gone,
            upstream_ca=v["upstream_ca"],
            mode=v["mode"],
            answer_status={**DEFAULT_STATUS, **dict(v["answer"])},
            synapse_admin_url=admin_url,
            synapse_admin_token=v["synapse_admin_token_file"],
            synapse_admin_poll=v["synapse_admin_poll"],
            hold_reborn=v["hold_reborn"],
            head_timeout=v["head_timeout"],
            max_head_size=v["max_head_size"],
            max_pending_clients=v["max_pending_clients"],
            prejudge_room=v["prejudge_room"],
        )


class _Reader:
    """Each option's value parsed once with the table's parser, or a ConfigError naming
    where the bad value came from. Options the command does not use read as defaults."""

    def __init__(self, raw: RawOptions, used: Sequence[Option]) -> None:
        self.raw = raw
        self.used = {o.name for o in used}
        self.parsed: dict[str, Any] = {}

    def source(self, name: str) -> Source:
        return self.raw.source(name) if name in self.used else self.raw.fallback

    def plain(self, name: str) -> Any:
        """The value reduced to str/bool (a list of them for a repeatable option)."""
        option = BY_NAME[name]
        value = self.raw.get(name, option.default) if name in self.used else option.default
        try:
            return _plain(option, value)
        except ValueError as e:
            self.fail(name, str(e))

    def text(self, name: str) -> str:
        return str(self.plain(name) or "")

    def __getitem__(self, name: str) -> Any:
        if name not in self.parsed:
            option, value = BY_NAME[name], self.plain(name)
            try:
                if option.repeatable:
                    self.parsed[name] = tuple(option.parse(str(v)) for v in _as_list(value))
                else:
                    self.parsed[name] = option.parse(value)
            except ValueError as e:
                self.fail(name, str(e))
        return self.parsed[name]

    def mention(self, name: str, value: bool = True) -> str:
        """Another option inside an error, spelled as it was given: `--min-ttl 1h`."""
        shown = self.plain(name) if value else ""
        return self.source(name).mention(BY_NAME[name], shown)

    def fail(self, name: str, problem: str) -> NoReturn:
        raise ConfigError(name, problem, self.source(name).label(BY_NAME[name]))


def _scalar(option: Option, value: object) -> str | bool:
    """One config value as the parsers take it; ValueError for anything else."""
    if isinstance(value, bool):
        if option.flag:
            return value
        return "true" if value else "false"
    if isinstance(value, int | float):
        try:
            return str(value)  # YAML `max_ttl: 3600` means the same as "3600"
        except ValueError:  # an int of thousands of digits
            raise ValueError("number too large") from None
    if isinstance(value, str):
        return value
    if value is None:  # YAML `key:` with nothing after it
        if option.flag:
            raise ValueError("needs true or false")
        return ""
    raise ValueError(f"expected one value, got a {type(value).__name__}")


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
