"""Who is in the scale world: N remote server names, which are live and how each dead one is
dead, where each name's DNS points, and every server's signing key.

Pure data, derived from (N, dead share, seed) alone, so the test process (which builds the
DNS zone and reads the counters) and the fake federation process (which serves the names)
agree on every name and key without talking to each other.

Every remote name is one label under `fed.test`, so one wildcard certificate from the test
CA covers them all. Addresses (the world's loopback, inside its private namespace):

    127.0.1.1   every live server (443 answers the well-known with 404, 8448 the API)
    127.0.3.1   blackholed: an nftables/iptables rule drops every SYN
    127.0.3.2   refusing: nothing listens, the kernel answers RST
    127.0.3.3   gone over HTTP: 410 on the well-known (`wk410`) or on /_matrix/ (`mx410`)
    127.0.3.4   where the TXT-tombstoned names still point (refusing)
    127.0.3.5   where the SRV "." names still point (blackholed)
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
GONE_HTTP_IP = "127.0.3.3"
BLACKHOLE_IPS = ("127.0.3.1", "127.0.3.5")  # the addresses whose SYNs the world drops
API_PORT = 8448
WELL_KNOWN_PORT = 443
# Long enough that no record expires within a run: every re-ask is then the asker's choice.
RECORD_TTL = 3600

# Each way a server can be dead: (name prefix, A record or None for NXDOMAIN).
DEAD_KINDS: dict[str, str | None] = {
    "blackhole": "127.0.3.1",
    "refuse": "127.0.3.2",
    "nxdomain": None,
    "txt_gone": "127.0.3.4",
    "srv_dot": "127.0.3.5",
    "wk410": GONE_HTTP_IP,
    "mx410": GONE_HTTP_IP,
}
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

    @property
    def live(self) -> bool:
        return self.kind in ("live", "hub")

    @property
    def user(self) -> str:
        return f"@{MEMBER_LOCALPART}:{self.name}"

    @property
    def address(self) -> str | None:
        """The A record's address, None for a name that does not exist."""
        return LIVE_IP if self.live else DEAD_KINDS[self.kind]


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
            servers.append(Server(f"{_PREFIX[kind]}{i:0{width}d}.{ZONE}", kind))
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
