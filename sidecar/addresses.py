"""Which upstream addresses the sidecar may connect to.

Synapse does not apply its `ip_range_blacklist` to proxied connections (DESIGN.md §2), so
the proxy must: a remote server name that resolves to loopback or a private network would
otherwise let any remote make the homeserver talk to the pod's own network.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Synapse's DEFAULT_IP_RANGE_BLOCKLIST (synapse/config/server.py), plus the unspecified
# addresses it always adds, so the sidecar refuses exactly what Synapse would.
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
)


def parse_network(text: str) -> IPNetwork:
    """Parse a CIDR (`10.1.0.0/16`, `fd00::/8`) or a single address; ValueError says why."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as e:
        raise ValueError(f"{text!r} is not an IP network in CIDR form: {e}") from None


_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def _forms(ip: IPAddress) -> tuple[IPAddress, ...]:
    """The address and any IPv4 address it carries, as Synapse's `generate_ip_set` checks:
    IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d) and 6to4 (2002:aabb:ccdd::)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return (ip,)
    forms: list[IPAddress] = [ip]
    if ip.ipv4_mapped is not None:
        forms.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        forms.append(ip.sixtofour)
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # not :: or ::1, which are v6 themselves
        forms.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return tuple(forms)


@dataclass(frozen=True)
class AddressPolicy:
    """Blocked ranges minus the operator's `--allow-address` exceptions."""

    blocked: tuple[IPNetwork, ...]
    allowed: tuple[IPNetwork, ...] = ()

    @classmethod
    def default(cls, allowed: Iterable[IPNetwork] = ()) -> AddressPolicy:
        return cls(tuple(parse_network(r) for r in DEFAULT_BLOCKED_RANGES), tuple(allowed))

    def blocked_by(self, address: str) -> IPNetwork | None:
        """The blocked range containing `address` (or the IPv4 inside it), or None."""
        forms = _forms(ipaddress.ip_address(address))
        if any(ip in net for ip in forms for net in self.allowed):
            return None
        for ip in forms:
            for net in self.blocked:
                if ip in net:
                    return net
        return None

    def choose(self, addresses: Iterable[str]) -> tuple[str | None, list[str]]:
        """Pick the first usable address (IPv4 first); also return the refused ones with why."""
        ordered = sorted(addresses, key=lambda a: ":" in a)
        refused: list[str] = []
        for address in ordered:
            net = self.blocked_by(address)
            if net is None:
                return address, refused
            refused.append(f"{address} (in {net})")
        return None, refused
