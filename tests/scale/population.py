"""Who is in the scale world: N remote server names, which are live and how each dead one is
dead, where each name's DNS points, and every server's signing key.

Pure data, derived from (N, dead share, seed) alone, so the test process (which builds the
DNS zone and reads the counters) and the fake federation process (which serves the names)
agree on every name and key without talking to each other.

Every remote name is one label under `fed.test`, so one wildcard certificate from the test
CA covers them all. Addresses (the world's loopback, inside its private namespace):

    127.0.1.1       every live server (443 answers the well-known with 404, 8448 the API)
    127.K.x.y       every dead server has an address of its own, so every SYN and every
                    request is attributed to one name; K says how it is dead:
        127.20/16   blackholed: an iptables rule drops every SYN to the /16
        127.21/16   refusing: nothing listens, the kernel answers RST
        127.22/16   where the TXT-tombstoned names still point (refusing)
        127.23/16   where the SRV "." names still point (blackholed)
        127.24/16   410 on the well-known and everything else (`wk410`)
        127.25/16   404 on the well-known, 410 on /_matrix/ (`mx410`)
    (NXDOMAIN names have no address.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

from tests.support.dns_server import Zone
from tests.support.signing import SigningKey

ZONE = "fed.test"
HUB = f"hub.{ZONE}"
ROOM_LOCALPART = "scale"
ROOM_ID = f"!{ROOM_LOCALPART}:{HUB}"
ROOM_ALIAS = f"#{ROOM_LOCALPART}:{HUB}"
MEMBER_LOCALPART = "m"  # every remote server has one joined user, @m:<name>

LIVE_IP = "127.0.1.1"
API_PORT = 8448
WELL_KNOWN_PORT = 443
# Long enough that no record expires within a run: every re-ask is then the asker's choice.
RECORD_TTL = 3600

# Each way a server can be dead: (kind, second octet of its /16, None for NXDOMAIN). A /16
# per kind keeps one iptables rule per blackholed kind and tells the kind from an address.
DEAD_KINDS: dict[str, int | None] = {
    "blackhole": 20,
    "refuse": 21,
    "nxdomain": None,
    "txt_gone": 22,
    "srv_dot": 23,
    "wk410": 24,
    "mx410": 25,
}
BLACKHOLE_KINDS = ("blackhole", "srv_dot")  # SYNs to their addresses are dropped
GONE_HTTP_KINDS = ("wk410", "mx410")  # the fake federation answers these with 410
DNS_SIGNAL_KINDS = ("nxdomain", "txt_gone", "srv_dot")  # DNS alone says they are gone
HOSTS_PER_NET = 254 * 256  # x.1 .. x.254 in each /24 of a kind's /16


# Every dead kind's /16 (127.20-127.25) and nothing else of the world's: the packet counter
# times the payload sent to these addresses (tests/support/packets.py).
DEAD_NETWORK = "127.16.0.0/12"


def kind_network(kind: str) -> str:
    """The /16 holding every address of one dead kind."""
    octet = DEAD_KINDS[kind]
    if octet is None:
        raise ValueError(f"{kind} servers have no address")
    return f"127.{octet}.0.0/16"


def dead_address(kind: str, ordinal: int) -> str | None:
    """The address of the `ordinal`-th (from 0) server of a dead kind."""
    octet = DEAD_KINDS[kind]
    if octet is None:
        return None
    if not 0 <= ordinal < HOSTS_PER_NET:
        raise ValueError(f"at most {HOSTS_PER_NET} servers of one kind")
    return f"127.{octet}.{ordinal // 254}.{ordinal % 254 + 1}"


_PREFIX = {
    "live": "l",
    "blackhole": "bh",
    "refuse": "rst",
    "nxdomain": "nx",
    "txt_gone": "txt",
    "srv_dot": "srv",
    "wk410": "wk",
    "mx410": "mx",
}
DEFAULT_DEAD_SHARE = 0.2  # a fifth of the room's servers dead, spread over every kind


@dataclass(frozen=True)
class Server:
    name: str
    kind: str  # "live", "hub" or one of DEAD_KINDS
    ordinal: int = 0  # its place among the servers of its kind (dead ones: its address)

    @property
    def live(self) -> bool:
        return self.kind in ("live", "hub")

    @property
    def user(self) -> str:
        return f"@{MEMBER_LOCALPART}:{self.name}"

    @property
    def address(self) -> str | None:
        """The A record's address, None for a name that does not exist."""
        return LIVE_IP if self.live else dead_address(self.kind, self.ordinal)


@dataclass(frozen=True)
class Population:
    """`count` remote servers besides the hub: `dead` of them spread over every dead kind."""

    count: int
    dead_share: float = DEFAULT_DEAD_SHARE
    seed: str = "scale-world"
    servers: tuple[Server, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.count < len(DEAD_KINDS) + 1:
            raise ValueError(f"a population needs at least {len(DEAD_KINDS) + 1} servers")
        dead = max(len(DEAD_KINDS), round(self.count * self.dead_share))
        live = self.count - dead
        width = len(str(self.count))
        servers = [Server(HUB, "hub")]
        servers += [Server(f"l{i:0{width}d}.{ZONE}", "live") for i in range(live)]
        kinds = list(DEAD_KINDS)
        for i in range(dead):  # round-robin: every kind gets its share, none is empty
            kind = kinds[i % len(kinds)]
            name = f"{_PREFIX[kind]}{i:0{width}d}.{ZONE}"
            servers.append(Server(name, kind, i // len(kinds)))
        object.__setattr__(self, "servers", tuple(servers))

    @cached_property
    def by_name(self) -> dict[str, Server]:
        return {server.name: server for server in self.servers}

    @property
    def live(self) -> list[Server]:
        return [s for s in self.servers if s.live]

    @property
    def dead(self) -> list[Server]:
        return [s for s in self.servers if not s.live]

    def of_kind(self, kind: str) -> list[Server]:
        return [s for s in self.servers if s.kind == kind]

    @cached_property
    def by_address(self) -> dict[str, Server]:
        """Each dead server by its own address (the live ones share one)."""
        return {s.address: s for s in self.dead if s.address is not None}

    def key_seed(self, name: str) -> bytes:
        """The 32-byte ed25519 seed of `name`'s signing key (same in every process)."""
        return hashlib.sha256(f"{self.seed}/{name}".encode()).digest()

    def key(self, name: str) -> SigningKey:
        return SigningKey(name, seed=self.key_seed(name))

    def __iter__(self) -> Iterator[Server]:
        return iter(self.servers)


def build_zone(zone: Zone, population: Population, synapse_name: str) -> None:
    """Every name's records, and an explicit NXDOMAIN for each SRV name nobody publishes:
    the test zone would otherwise scan every record to tell NXDOMAIN from an empty
    non-terminal, which at 10,000 names costs more than the whole answer."""
    ttl = RECORD_TTL
    zone.add(ZONE, "SOA", f"ns1.{ZONE} hostmaster.{ZONE} 1 3600 600 86400 {ttl}", ttl=ttl)
    zone.add("test", "SOA", f"ns1.test hostmaster.test 1 3600 600 86400 {ttl}", ttl=ttl)
    zone.add(synapse_name, "A", "127.0.0.1", ttl=ttl)
    for server in population:
        name = server.name
        if server.kind == "nxdomain":
            zone.nxdomain(name, soa_minimum=ttl, soa_ttl=ttl)
            continue
        address = server.address
        assert address is not None
        zone.add(name, "A", address, ttl=ttl)
        if server.kind == "txt_gone":
            zone.add(name, "TXT", "v=matrix;gone", ttl=ttl)
        if server.kind == "srv_dot":
            zone.add(f"_matrix-fed._tcp.{name}", "SRV", "0 0 0 .", ttl=ttl)
        else:
            zone.nxdomain(f"_matrix-fed._tcp.{name}", soa_minimum=ttl, soa_ttl=ttl)
        zone.nxdomain(f"_matrix._tcp.{name}", soa_minimum=ttl, soa_ttl=ttl)
