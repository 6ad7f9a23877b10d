"""sidecar.remote.addresses: the proxy refuses the upstream addresses Synapse would refuse."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.judge.names import Authority
from sidecar.remote.addresses import (
    DEFAULT_BLOCKED_RANGES,
    AddressPolicy,
    own_addresses,
    parse_network,
)

# Synapse's DEFAULT_IP_RANGE_BLACKLIST (synapse/config/server.py), copied here on purpose so a
# change to the sidecar's table cannot silently drop one.
SYNAPSE_DEFAULT_IP_RANGE_BLACKLIST = (
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "192.0.0.0/24",
    "169.254.0.0/16",
    "192.88.99.0/24",
    "198.18.0.0/15",
    "192.0.2.0/24",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "::1/128",
    "fe80::/10",
    "fc00::/7",
    "2001:db8::/32",
    "ff00::/8",
    "fec0::/10",
)
SYNAPSE_ALWAYS_BLOCKED = ("0.0.0.0", "::")


@pytest.fixture(scope="module")
def policy() -> AddressPolicy:
    return AddressPolicy.default()


@pytest.mark.parametrize(
    ("address", "network"),
    [
        ("127.0.0.1", "127.0.0.0/8"),
        ("127.255.255.254", "127.0.0.0/8"),
        ("10.1.2.3", "10.0.0.0/8"),
        ("172.16.0.1", "172.16.0.0/12"),
        ("172.31.255.255", "172.16.0.0/12"),
        ("192.168.1.1", "192.168.0.0/16"),
        ("100.64.0.1", "100.64.0.0/10"),
        ("192.0.0.8", "192.0.0.0/24"),
        ("169.254.1.1", "169.254.0.0/16"),
        ("169.254.169.254", "169.254.0.0/16"),
        ("192.88.99.1", "192.88.99.0/24"),
        ("198.18.0.1", "198.18.0.0/15"),
        ("198.19.255.1", "198.18.0.0/15"),
        ("192.0.2.1", "192.0.2.0/24"),
        ("198.51.100.1", "198.51.100.0/24"),
        ("203.0.113.1", "203.0.113.0/24"),
        ("224.0.0.1", "224.0.0.0/4"),
        ("239.255.255.250", "224.0.0.0/4"),
        ("0.0.0.0", "0.0.0.0/8"),
        ("::", "::/128"),
        ("::1", "::1/128"),
        ("fe80::1", "fe80::/10"),
        ("fc00::1", "fc00::/7"),
        ("fd12::1", "fc00::/7"),
        ("2001:db8::1", "2001:db8::/32"),
        ("ff02::1", "ff00::/8"),
        ("fec0::1", "fec0::/10"),
        ("::ffff:127.0.0.1", "127.0.0.0/8"),
        ("::ffff:10.0.0.1", "10.0.0.0/8"),
        ("::ffff:169.254.169.254", "169.254.0.0/16"),
        ("0:0:0:0:0:ffff:7f00:1", "127.0.0.0/8"),
    ],
)
def test_default_blocks(policy: AddressPolicy, address: str, network: str) -> None:
    assert policy.blocked_by(address) == ipaddress.ip_network(network)


@pytest.mark.parametrize("network", SYNAPSE_DEFAULT_IP_RANGE_BLACKLIST)
def test_every_synapse_range_is_blocked_end_to_end(policy: AddressPolicy, network: str) -> None:
    net = ipaddress.ip_network(network)
    for address in (net.network_address, net.broadcast_address):
        assert policy.blocked_by(str(address)) is not None, f"{address} in {net}"


@pytest.mark.parametrize("address", SYNAPSE_ALWAYS_BLOCKED)
def test_unspecified_addresses_are_blocked(policy: AddressPolicy, address: str) -> None:
    assert policy.blocked_by(address) is not None


def test_default_table_is_a_superset_of_synapses() -> None:
    ours = {ipaddress.ip_network(r) for r in DEFAULT_BLOCKED_RANGES}
    for network in SYNAPSE_DEFAULT_IP_RANGE_BLACKLIST:
        assert ipaddress.ip_network(network) in ours


@pytest.mark.parametrize(
    "address",
    [
        "1.1.1.1",
        "8.8.8.8",
        "9.9.9.9",
        "93.184.216.34",
        "126.255.255.255",
        "128.0.0.1",
        "172.15.255.255",
        "172.32.0.1",
        "100.63.255.255",
        "100.128.0.1",
        "192.169.0.1",
        "223.255.255.255",
        "2606:4700::1111",
        "2001:4860:4860::8888",
        "2a00:1450:4001::1",
        "::ffff:1.1.1.1",
    ],
)
def test_default_passes_public_addresses(policy: AddressPolicy, address: str) -> None:
    assert policy.blocked_by(address) is None


@pytest.mark.parametrize(
    "address",
    [
        pytest.param("::127.0.0.1", id="ipv4-compatible-loopback"),
        pytest.param("::10.0.0.1", id="ipv4-compatible-rfc1918"),
        pytest.param("2002:7f00:1::1", id="6to4-loopback"),
        pytest.param("2002:a9fe:a9fe::", id="6to4-link-local-metadata"),
    ],
)
def test_default_blocks_ipv6_embeddings_synapse_blocks(policy: AddressPolicy, address: str) -> None:
    assert policy.blocked_by(address) is not None


def test_allow_list_makes_an_exception() -> None:
    policy = AddressPolicy.default([parse_network("127.0.0.0/8")])
    assert policy.blocked_by("127.0.0.5") is None
    assert policy.blocked_by("::ffff:127.0.0.5") is None
    assert policy.blocked_by("10.0.0.1") == ipaddress.ip_network("10.0.0.0/8")
    assert policy.blocked_by("::1") == ipaddress.ip_network("::1/128")


def test_allow_list_exception_can_be_narrower_than_the_block() -> None:
    policy = AddressPolicy.default([parse_network("10.1.0.0/16"), parse_network("fd00::/64")])
    assert policy.blocked_by("10.1.2.3") is None
    assert policy.blocked_by("10.2.0.1") == ipaddress.ip_network("10.0.0.0/8")
    assert policy.blocked_by("fd00::5") is None
    assert policy.blocked_by("fd00:0:0:1::5") == ipaddress.ip_network("fc00::/7")


def test_allow_list_of_the_other_family_does_not_match() -> None:
    policy = AddressPolicy.default([parse_network("::/0")])
    assert policy.blocked_by("127.0.0.1") == ipaddress.ip_network("127.0.0.0/8")
    assert policy.blocked_by("::1") is None


def test_blocked_by_rejects_non_addresses(policy: AddressPolicy) -> None:
    with pytest.raises(ValueError):
        policy.blocked_by("example.org")


def test_choose_prefers_ipv4(policy: AddressPolicy) -> None:
    chosen, refused = policy.choose(["2606:4700::1111", "1.1.1.1", "2001:4860:4860::8888"])
    assert chosen == "1.1.1.1"
    assert refused == []


def test_choose_falls_back_to_ipv6(policy: AddressPolicy) -> None:
    chosen, refused = policy.choose(["2606:4700::1111", "10.0.0.1"])
    assert chosen == "2606:4700::1111"
    assert refused == ["10.0.0.1 (in 10.0.0.0/8)"]


def test_choose_keeps_order_within_a_family(policy: AddressPolicy) -> None:
    chosen, _ = policy.choose(["2606:4700::1111", "8.8.8.8", "1.1.1.1"])
    assert chosen == "8.8.8.8"


def test_choose_reports_refused_addresses_with_their_range(policy: AddressPolicy) -> None:
    chosen, refused = policy.choose(["::1", "fd12::1", "127.0.0.1", "192.168.1.1"])
    assert chosen is None
    assert refused == [
        "127.0.0.1 (in 127.0.0.0/8)",
        "192.168.1.1 (in 192.168.0.0/16)",
        "::1 (in ::1/128)",
        "fd12::1 (in fc00::/7)",
    ]


def test_choose_stops_at_the_first_usable_address(policy: AddressPolicy) -> None:
    chosen, refused = policy.choose(["127.0.0.1", "1.1.1.1", "10.0.0.1"])
    assert chosen == "1.1.1.1"
    assert refused == ["127.0.0.1 (in 127.0.0.0/8)"]


def test_choose_nothing(policy: AddressPolicy) -> None:
    assert policy.choose([]) == (None, [])


def test_choose_with_allowed_address() -> None:
    policy = AddressPolicy.default([parse_network("127.0.0.0/8")])
    assert policy.choose(["::1", "127.0.0.1"]) == ("127.0.0.1", [])


@pytest.mark.parametrize(
    ("text", "network"),
    [
        ("10.1.0.0/16", "10.1.0.0/16"),
        (" 10.1.0.0/16 ", "10.1.0.0/16"),
        ("10.1.2.3/16", "10.1.0.0/16"),
        ("10.1.2.3", "10.1.2.3/32"),
        ("fd00::/8", "fd00::/8"),
        ("::1", "::1/128"),
        ("2001:DB8::/32", "2001:db8::/32"),
    ],
)
def test_parse_network(text: str, network: str) -> None:
    assert parse_network(text) == ipaddress.ip_network(network)


@pytest.mark.parametrize(
    "text", ["", "banana", "10.0.0.0/33", "fd00::/129", "10.0.0.0/8/8", "example.org", "10.0.0"]
)
def test_parse_network_rejects(text: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        parse_network(text)
    assert str(excinfo.value).startswith(f"{text!r} is not an IP network in CIDR form: ")


# -- issue 14: every IPv6 form that embeds an IPv4, reserved ranges, the sidecar itself ------
# A table like Smokescreen's classifier tests (pkg/smokescreen/smokescreen_test.go). One
# decision differs: Smokescreen refuses every NAT64, 6to4 and Teredo address; the sidecar
# refuses one when the IPv4 inside is blocked, since a federation peer may be reachable
# only through the network's NAT64 (an IPv6-only cluster with DNS64).


@pytest.mark.parametrize(
    ("address", "why"),
    [
        # NAT64, well-known prefix 64:ff9b::/96: the IPv4 is the last 32 bits (RFC 6052)
        ("64:ff9b::7f00:1", "NAT64 of 127.0.0.1, in 127.0.0.0/8"),
        ("64:ff9b::a00:1", "NAT64 of 10.0.0.1, in 10.0.0.0/8"),
        ("64:ff9b::ac1c:5", "NAT64 of 172.28.0.5, in 172.16.0.0/12"),
        ("64:ff9b::c0a8:101", "NAT64 of 192.168.1.1, in 192.168.0.0/16"),
        ("64:ff9b::a9fe:a9fe", "NAT64 of 169.254.169.254, in 169.254.0.0/16"),
        ("64:ff9b::6440:1", "NAT64 of 100.64.0.1, in 100.64.0.0/10"),
        ("64:ff9b::c000:201", "NAT64 of 192.0.2.1, in 192.0.2.0/24"),
        ("64:ff9b::ffff:ffff", "NAT64 of 255.255.255.255, in 255.255.255.255/32"),
        ("64:ff9b::f000:1", "NAT64 of 240.0.0.1, in 240.0.0.0/4"),
        ("64:ff9b::", "NAT64 of 0.0.0.0, in 0.0.0.0/8"),
        # NAT64, local-use prefix (RFC 8215): refused as a range, whatever it embeds
        ("64:ff9b:1::7f00:1", "in 64:ff9b:1::/48"),
        ("64:ff9b:1:7f00:0:100::", "in 64:ff9b:1::/48"),  # 127.0.0.1 in the /48 layout
        ("64:ff9b:1:abcd:ef01:2345:808:808", "in 64:ff9b:1::/48"),
        # IPv4-mapped ::ffff:0:0/96: dialled as the IPv4 itself
        ("::ffff:7f00:1", "IPv4-mapped of 127.0.0.1, in 127.0.0.0/8"),
        ("::ffff:255.255.255.255", "IPv4-mapped of 255.255.255.255, in 255.255.255.255/32"),
        # IPv4-translated ::ffff:0:0:0/96 (SIIT, RFC 2765)
        ("::ffff:0:7f00:1", "IPv4-translated of 127.0.0.1, in 127.0.0.0/8"),
        ("::ffff:0:a00:1", "IPv4-translated of 10.0.0.1, in 10.0.0.0/8"),
        # IPv4-compatible ::/96 (deprecated)
        ("::a9fe:a9fe", "IPv4-compatible of 169.254.169.254, in 169.254.0.0/16"),
        # 6to4 2002::/16: the IPv4 is bits 16-47
        ("2002:a00:1::1", "6to4 of 10.0.0.1, in 10.0.0.0/8"),
        ("2002:c000:201::1", "6to4 of 192.0.2.1, in 192.0.2.0/24"),
        ("2002:f000:1::", "6to4 of 240.0.0.1, in 240.0.0.0/4"),
        # Teredo 2001::/32: server in bits 32-63, client bit-inverted in the last 32 bits
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo client of 192.0.2.45, in 192.0.2.0/24"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "Teredo client of 127.0.0.1, in 127.0.0.0/8"),
        ("2001:0:a00:1:8000:63bf:f7f7:f7f7", "Teredo server of 10.0.0.1, in 10.0.0.0/8"),
        # reserved IPv4 ranges Synapse's list misses (IANA special-purpose registry)
        ("240.0.0.1", "in 240.0.0.0/4"),
        ("254.255.255.255", "in 240.0.0.0/4"),
        ("255.255.255.255", "in 255.255.255.255/32"),
        # reserved IPv6 ranges Synapse's list misses (IANA special-purpose registry)
        ("100::1", "in 100::/64"),
        ("2001:2::1", "in 2001:2::/48"),
        ("2001:10::1", "in 2001:10::/28"),
        ("3fff::1", "in 3fff::/20"),
        ("5f00::1", "in 5f00::/16"),
    ],
)
def test_address_classes(policy: AddressPolicy, address: str, why: str) -> None:
    assert policy.why(address) == why
    assert policy.blocked_by(address) is not None
    assert policy.choose([address]) == (None, [f"{address} ({why})"])


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::808:808",  # NAT64 of 8.8.8.8: a public peer behind DNS64
        "64:ff9b::5db8:d822",  # NAT64 of 93.184.216.34
        "::ffff:0:808:808",  # IPv4-translated 8.8.8.8
        "2002:808:808::1",  # 6to4 of 8.8.8.8
        "2001:0:4136:e378:8000:63bf:f7f7:f7f7",  # Teredo: public server, client 8.8.8.8
    ],
)
def test_embeddings_of_public_ipv4_pass(policy: AddressPolicy, address: str) -> None:
    assert policy.why(address) is None


def _embeddings(v4: ipaddress.IPv4Address) -> dict[str, str]:
    n = int(v4)
    return {
        "IPv4-mapped": str(ipaddress.IPv6Address((0xFFFF << 32) | n)),
        "IPv4-translated": str(ipaddress.IPv6Address((0xFFFF << 48) | n)),
        "NAT64": str(ipaddress.IPv6Address((0x64FF9B << 96) | n)),
        "6to4": str(ipaddress.IPv6Address((0x2002 << 112) | (n << 80) | 1)),
        "Teredo client": str(
            ipaddress.IPv6Address((0x20010000 << 96) | (0x413601A0 << 64) | (n ^ 0xFFFFFFFF))
        ),
    }


@pytest.mark.parametrize(
    "network", [r for r in DEFAULT_BLOCKED_RANGES if ipaddress.ip_network(r).version == 4]
)
def test_every_embedding_of_every_blocked_ipv4_is_blocked(
    policy: AddressPolicy, network: str
) -> None:
    net = ipaddress.IPv4Network(network)
    for v4 in (net.network_address, net.broadcast_address):
        for form, address in _embeddings(v4).items():
            why = policy.why(address)
            assert why is not None and why.startswith(f"{form} of {v4}, in "), (address, why)


def test_an_exception_for_the_ipv4_covers_only_the_mapped_form() -> None:
    """`--allow-address 127.0.0.0/8` lets the sidecar dial loopback. A NAT64, 6to4 or
    Teredo address is dialled through a translator or relay, whose own loopback that
    exception never meant: it stays refused unless the IPv6 address itself is allowed."""
    policy = AddressPolicy.default([parse_network("127.0.0.0/8")])
    assert policy.why("::ffff:127.0.0.1") is None
    assert policy.why("64:ff9b::7f00:1") == "NAT64 of 127.0.0.1, in 127.0.0.0/8"
    assert policy.why("2002:7f00:1::1") == "6to4 of 127.0.0.1, in 127.0.0.0/8"
    assert policy.why("::ffff:0:7f00:1") == "IPv4-translated of 127.0.0.1, in 127.0.0.0/8"
    nat64 = AddressPolicy.default([parse_network("64:ff9b::/96")])
    assert nat64.why("64:ff9b::7f00:1") is None
    local_use = AddressPolicy.default([parse_network("64:ff9b:1:abcd::/96")])
    assert local_use.why("64:ff9b:1:abcd::808:808") is None
    assert local_use.why("64:ff9b:1:1234::808:808") == "in 64:ff9b:1::/48"


def test_the_sidecars_own_listen_addresses_are_refused() -> None:
    listen = Authority("93.184.216.34", 3128)
    ops = Authority("2606:2800:220:1::1", 9480)
    policy = AddressPolicy.default(own=[listen, ops])
    own = "the sidecar's own listen address"
    assert policy.why("93.184.216.34") == f"{own} 93.184.216.34"
    assert policy.why("::ffff:93.184.216.34") == f"{own} 93.184.216.34"
    assert policy.why("2606:2800:220:1::1") == f"{own} 2606:2800:220:1::1"
    assert policy.blocked_by("93.184.216.34") == ipaddress.ip_network("93.184.216.34/32")
    assert policy.why("93.184.216.35") is None
    allowed = AddressPolicy.default([parse_network("93.184.216.34/32")], own=[listen])
    assert allowed.why("93.184.216.34") is None  # --allow-address still overrides


@pytest.mark.parametrize(
    ("host", "own"),
    [
        ("0.0.0.0", ()),  # wildcard: the unspecified address is blocked already
        ("::", ()),
        ("localhost", ("127.0.0.1/32", "::1/128")),
        ("127.0.0.1", ("127.0.0.1/32",)),
        ("192.0.2.10", ("192.0.2.10/32",)),
    ],
)
def test_own_addresses_from_listeners(host: str, own: tuple[str, ...]) -> None:
    listeners = [Authority(host, 3128), None, Authority(host, 9480)]
    assert own_addresses(listeners) == tuple(ipaddress.ip_network(n) for n in own)


@given(st.integers(0, 2**32 - 1))
def test_an_embedding_is_blocked_exactly_when_its_ipv4_is(n: int) -> None:
    """Any IPv4: each translated form is refused iff the IPv4 itself is (the Teredo form
    uses a public server, so only its client decides)."""
    policy = AddressPolicy.default()
    v4 = ipaddress.IPv4Address(n)
    blocked = policy.blocked_by(str(v4)) is not None
    for form, address in _embeddings(v4).items():
        assert (policy.blocked_by(address) is not None) == blocked, (form, address)
