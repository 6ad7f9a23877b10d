"""sidecar.addresses: the proxy refuses the upstream addresses Synapse would refuse."""

from __future__ import annotations

import ipaddress

import pytest

from sidecar.addresses import DEFAULT_BLOCKED_RANGES, AddressPolicy, parse_network

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
