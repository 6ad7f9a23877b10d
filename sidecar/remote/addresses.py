"""Which upstream addresses the sidecar may connect to.

Synapse does not apply its `ip_range_blacklist` to proxied connections (docs/design.md §2), so
the proxy must: a remote server name that resolves to loopback or a private network would
otherwise let any remote make the homeserver talk to the pod's own network.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from sidecar.judge.names import Authority

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Synapse's DEFAULT_IP_RANGE_BLOCKLIST (synapse/config/server.py), plus the unspecified
# addresses it always adds, so the sidecar refuses at least what Synapse would; then the
# entries of IANA's IPv4 and IPv6 special-purpose address registries that are not
# globally reachable and that Synapse's list misses (issue 14).
DEFAULT_BLOCKED_RANGES: tuple[str, ...] = (
    "127.0.0.0/8",  # loopback
    "10.0.0.0/8",  # RFC 1918
    "172.16.0.0/12",  # RFC 1918
    "192.168.0.0/16",  # RFC 1918
    "100.64.0.0/10",  # carrier-grade NAT
    "192.0.0.0/24",  # IETF protocol assignments
    "169.254.0.0/16",  # link-local
    "192.88.99.0/24",  # 6to4 relay anycast
    "198.18.0.0/15",  # benchmarking
    "192.0.2.0/24",  # documentation TEST-NET-1
    "198.51.100.0/24",  # documentation TEST-NET-2
    "203.0.113.0/24",  # documentation TEST-NET-3
    "224.0.0.0/4",  # multicast
    "0.0.0.0/8",  # "this network", unspecified
    "::/128",  # unspecified
    "::1/128",  # loopback
    "fe80::/10",  # link-local
    "fc00::/7",  # unique local
    "2001:db8::/32",  # documentation
    "ff00::/8",  # multicast
    "fec0::/10",  # site-local (deprecated)
    # -- beyond Synapse: IANA special-purpose, not globally reachable --
    "255.255.255.255/32",  # limited broadcast (RFC 919); listed before 240/4 to name it
    "240.0.0.0/4",  # reserved for future use (RFC 1112)
    "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215): its IPv4 layout is a local choice
    "100::/64",  # discard-only (RFC 6666)
    "2001:2::/48",  # benchmarking (RFC 5180)
    "2001:10::/28",  # ORCHID, deprecated (RFC 4843)
    "3fff::/20",  # documentation (RFC 9637)
    "5f00::/16",  # segment routing SIDs (RFC 9602)
)


def parse_network(text: str) -> IPNetwork:
    """Parse a CIDR (`10.1.0.0/16`, `fd00::/8`) or a single address; ValueError says why."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as e:
        raise ValueError(f"{text!r} is not an IP network in CIDR form: {e}") from None


_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
_LOW32 = 0xFFFFFFFF


def embedded_ipv4(ip: IPAddress) -> list[tuple[str, ipaddress.IPv4Address]]:
    """Every IPv4 address an IPv6 address carries, with the form that carries it.

    The forms Synapse's `generate_ip_set` checks (IPv4-mapped, IPv4-compatible, 6to4) and
    the ones it misses (issue 14): IPv4-translated (SIIT), NAT64 with the well-known
    prefix (RFC 6052: the last 32 bits), and Teredo (the server, and the client, stored
    bit-inverted). The local-use NAT64 prefix 64:ff9b:1::/48 is not read: its layout (an
    RFC 6052 length from /48 to /96) is a local choice the sidecar cannot see, so the
    whole prefix is a blocked range (IANA: not globally reachable).
    """
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    found: list[tuple[str, ipaddress.IPv4Address]] = []
    n = int(ip)
    if ip.ipv4_mapped is not None:
        found.append(("IPv4-mapped", ip.ipv4_mapped))
    elif ip in _IPV4_TRANSLATED:
        found.append(("IPv4-translated", ipaddress.IPv4Address(n & _LOW32)))
    elif ip in _IPV4_COMPATIBLE and n > 1:  # not :: or ::1, which are v6 themselves
        found.append(("IPv4-compatible", ipaddress.IPv4Address(n & _LOW32)))
    elif ip in _NAT64_WELL_KNOWN:
        found.append(("NAT64", ipaddress.IPv4Address(n & _LOW32)))
    elif ip.sixtofour is not None:
        found.append(("6to4", ip.sixtofour))
    elif ip.teredo is not None:
        server, client = ip.teredo
        found += [("Teredo client", client), ("Teredo server", server)]
    return found


def own_addresses(listeners: Iterable[Authority | None]) -> tuple[IPNetwork, ...]:
    """The sidecar's own listen addresses (`--listen`, `--ops-listen`) as /32 or /128.

    A name that resolves to the sidecar itself would loop a tunnel back into the proxy
    (or reach the ops API through it). A wildcard listener (0.0.0.0, ::) adds nothing: the
    unspecified address is blocked already, and the pod's interface addresses are in
    private ranges (RFC 1918, ULA) that are blocked by default.
    """
    networks: list[IPNetwork] = []
    for listener in listeners:
        if listener is None:
            continue
        hosts = ("127.0.0.1", "::1") if listener.host == "localhost" else (listener.host,)
        for host in hosts:
            network = ipaddress.ip_network(host)
            if not network.network_address.is_unspecified and network not in networks:
                networks.append(network)
    return tuple(networks)


@dataclass(frozen=True)
class AddressPolicy:
    """Blocked ranges and the sidecar's own addresses, minus `--allow-address` exceptions."""

    blocked: tuple[IPNetwork, ...]
    allowed: tuple[IPNetwork, ...] = ()
    own: tuple[IPNetwork, ...] = ()

    @classmethod
    def default(
        cls, allowed: Iterable[IPNetwork] = (), own: Iterable[Authority | None] = ()
    ) -> AddressPolicy:
        """The default table; `own` are the sidecar's listeners (see `own_addresses`)."""
        blocked = tuple(parse_network(r) for r in DEFAULT_BLOCKED_RANGES)
        return cls(blocked, tuple(allowed), own_addresses(own))

    def blocked_by(self, address: str) -> IPNetwork | None:
        """The blocked range containing `address` (or an IPv4 inside it), or None."""
        refusal = self._refusal(address)
        return refusal[0] if refusal is not None else None

    def why(self, address: str) -> str | None:
        """Why `address` is refused, for the 403 and the log; None when it may be dialled."""
        refusal = self._refusal(address)
        return refusal[1] if refusal is not None else None

    def _refusal(self, address: str) -> tuple[IPNetwork, str] | None:
        ip = ipaddress.ip_address(address)
        embedded = embedded_ipv4(ip)
        # An exception names the address as dialled. An IPv4-mapped address is dialled as
        # its IPv4, so an exception for that IPv4 covers it; any other embedding goes
        # through a translator or relay, which an exception for the IPv4 does not cover.
        exempt = [ip, *(v4 for form, v4 in embedded if form == "IPv4-mapped")]
        if any(a in net for a in exempt for net in self.allowed):
            return None
        for net in self.own:
            if any(a in net for a in exempt):
                return net, f"the sidecar's own listen address {net.network_address}"
        for net in self.blocked:
            if ip in net:
                return net, f"in {net}"
        for form, v4 in embedded:
            for net in self.blocked:
                if v4 in net:
                    return net, f"{form} of {v4}, in {net}"
        return None

    def choose(self, addresses: Iterable[str]) -> tuple[str | None, list[str]]:
        """Pick the first usable address (IPv4 first); also return the refused ones with why."""
        ordered = sorted(addresses, key=lambda a: ":" in a)
        refused: list[str] = []
        for address in ordered:
            why = self.why(address)
            if why is None:
                return address, refused
            refused.append(f"{address} ({why})")
        return None, refused
