"""sidecar.judge.names: one canonical key per server, and a precise reason for every rejection."""

from __future__ import annotations

import pytest

from sidecar.judge.names import (
    DEFAULT_PORT,
    MAX_LABEL_LENGTH,
    MAX_NAME_LENGTH,
    Authority,
    InvalidName,
    is_ip_literal,
    is_under,
    normalize_host,
    parse_authority,
)

# A name of exactly MAX_NAME_LENGTH characters: three 63-character labels, one of 61, three dots.
LONGEST_NAME = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("example.org", "example.org"),
        ("Example.ORG", "example.org"),
        ("example.org.", "example.org"),
        ("EXAMPLE.org.", "example.org"),
        ("  example.org\n", "example.org"),
        ("localhost", "localhost"),
        ("Bücher.Example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
        ("例え.jp", "xn--r8jz45g.jp"),
        ("_matrix-fed._tcp.example.org", "_matrix-fed._tcp.example.org"),
        ("a-b.example", "a-b.example"),
        ("1.2.3.4", "1.2.3.4"),
        ("1.2.3.4.", "1.2.3.4"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
        ("[2001:0db8:0000:0000:0000:0000:0000:0001]", "2001:db8::1"),
        ("2001:db8::", "2001:db8::"),
        (LONGEST_NAME, LONGEST_NAME),
        (LONGEST_NAME + ".", LONGEST_NAME),
        ("a" * 63 + ".example", "a" * 63 + ".example"),
    ],
)
def test_normalize_host_canonical_form(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected


def test_normalize_host_is_idempotent() -> None:
    for raw in ("Bücher.Example.", "[2001:DB8::0:1]", "_Matrix._TCP.Example.org", "10.0.0.1"):
        once = normalize_host(raw)
        assert normalize_host(once) == once


@pytest.mark.parametrize(
    ("raw", "message_part"),
    [
        ("", "empty name"),
        ("   ", "empty name"),
        (".", "root name"),
        ("..", "empty label"),
        ("example..org", "empty label"),
        (".example.org", "empty label"),
        ("a" * 64 + ".example", "64 characters long; DNS allows 63"),
        (LONGEST_NAME + "d", "254 characters long; DNS allows 253"),
        ("exa mple.org", "contains ' '"),
        ("user@example.org", "contains '@'"),
        ("example.org/path", "contains '/'"),
        ("exa\x00mple.org", "contains '\\x00'"),
        ("exa\x7fmple.org", "contains '\\x7f'"),
        ("exa\tmple.org", "contains '\\t'"),
        ("-example.org", "starts or ends with '-'"),
        ("example-.org", "starts or ends with '-'"),
        ("example.-org", "starts or ends with '-'"),
        ("exa*mple.org", "contains '*'"),
        ("ü" * 70 + ".example", "not valid IDNA"),
        ("::1::2", "not a valid IPv6 literal"),
        ("[::1", "not a valid IPv6 literal"),
        ("1:2:3:4:5:6:7:8:9", "not a valid IPv6 literal"),
        ("[::g]", "not a valid IPv6 literal"),
    ],
)
def test_normalize_host_rejects_with_reason(raw: str, message_part: str) -> None:
    with pytest.raises(InvalidName) as excinfo:
        normalize_host(raw)
    assert message_part in str(excinfo.value)


def test_invalid_name_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="empty name"):
        normalize_host("")


def test_normalize_host_rejects_non_strings() -> None:
    with pytest.raises(InvalidName, match="expected a name, got bytes"):
        normalize_host(b"example.org")  # type: ignore[arg-type,unused-ignore]


def test_long_garbage_is_shortened_in_the_message() -> None:
    raw = "x y" * 1000
    with pytest.raises(InvalidName) as excinfo:
        normalize_host(raw)
    message = str(excinfo.value)
    assert "…" in message
    assert len(message) < 300


@pytest.mark.parametrize("raw", ["fe80::1%x\x00y", "fe80::1%a b", "[::1%eth0\nX-Evil: 1]"])
def test_normalize_host_rejects_garbage_in_an_ipv6_zone_id(raw: str) -> None:
    with pytest.raises(InvalidName):
        normalize_host(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1.2.3.4", True),
        ("::1", True),
        ("2001:db8::1", True),
        ("[::1]", False),
        ("example.org", False),
        ("1.2.3", False),
        ("", False),
    ],
)
def test_is_ip_literal(raw: str, expected: bool) -> None:
    assert is_ip_literal(raw) is expected


@pytest.mark.parametrize(
    ("raw", "host", "port"),
    [
        ("example.org", "example.org", DEFAULT_PORT),
        ("Example.ORG.", "example.org", DEFAULT_PORT),
        ("example.org:8448", "example.org", 8448),
        (" example.org:8448 ", "example.org", 8448),
        ("example.org:0443", "example.org", 443),
        ("example.org:1", "example.org", 1),
        ("example.org:65535", "example.org", 65535),
        ("Bücher.example:8448", "xn--bcher-kva.example", 8448),
        ("1.2.3.4:80", "1.2.3.4", 80),
        ("[::1]:8448", "::1", 8448),
        ("[2001:DB8::0:1]:443", "2001:db8::1", 443),
        ("[::1]", "::1", DEFAULT_PORT),
        ("::1", "::1", DEFAULT_PORT),
        ("2001:db8::1", "2001:db8::1", DEFAULT_PORT),
    ],
)
def test_parse_authority(raw: str, host: str, port: int) -> None:
    assert parse_authority(raw) == Authority(host, port)


def test_parse_authority_default_port_is_configurable() -> None:
    assert parse_authority("example.org", default_port=53) == Authority("example.org", 53)
    assert parse_authority("example.org:5353", default_port=53).port == 5353


@pytest.mark.parametrize(
    ("raw", "message_part"),
    [
        ("", "empty authority"),
        ("  ", "empty authority"),
        ("example.org:0", "port 0 is outside 1-65535"),
        ("example.org:65536", "port 65536 is outside 1-65535"),
        ("example.org:abc", "port 'abc' is not a number"),
        ("example.org:", "port '' is not a number"),
        ("example.org:-1", "port '-1' is not a number"),
        ("example.org: 80", "port ' 80' is not a number"),
        ("[::1]:", "port '' is not a number"),
        ("[::1]:0", "port 0 is outside 1-65535"),
        ("[::1]:x", "port 'x' is not a number"),
        ("[::1", "'[' without ']'"),
        ("[::1]8448", "unexpected '8448' after ']'"),
        ("user@example.org:443", "contains '@'"),
        ("exa mple.org:443", "contains ' '"),
    ],
)
def test_parse_authority_rejects_with_reason(raw: str, message_part: str) -> None:
    with pytest.raises(InvalidName) as excinfo:
        parse_authority(raw)
    assert message_part in str(excinfo.value)


@pytest.mark.parametrize(
    "port",
    [
        pytest.param("¹", id="superscript-one"),
        pytest.param("٨٠", id="arabic-indic-80"),
        pytest.param("\uff18\uff14\uff14\uff18", id="fullwidth-8448"),
        pytest.param("1" * 5000, id="5000-digits"),
    ],
)
def test_parse_authority_rejects_non_ascii_or_absurd_port_digits(port: str) -> None:
    with pytest.raises(InvalidName):
        parse_authority(f"example.org:{port}")


@pytest.mark.parametrize(
    ("authority", "text"),
    [
        (Authority("example.org", 443), "example.org:443"),
        (Authority("1.2.3.4", 8448), "1.2.3.4:8448"),
        (Authority("::1", 8448), "[::1]:8448"),
        (Authority("2001:db8::1", 443), "[2001:db8::1]:443"),
    ],
)
def test_authority_str(authority: Authority, text: str) -> None:
    assert str(authority) == text


@pytest.mark.parametrize("raw", ["example.org:8448", "[2001:db8::1]:443", "1.2.3.4:1"])
def test_authority_str_round_trips(raw: str) -> None:
    assert str(parse_authority(raw)) == raw


def test_authority_is_frozen_and_hashable() -> None:
    a = Authority("example.org", 443)
    assert {a, Authority("example.org", 443)} == {a}
    with pytest.raises(AttributeError):
        a.port = 80  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "suffix", "expected"),
    [
        ("example.org", "example.org", True),
        ("matrix.example.org", "example.org", True),
        ("a.b.example.org", "example.org", True),
        ("badexample.org", "example.org", False),
        ("example.org", "matrix.example.org", False),
        ("example.org.evil", "example.org", False),
        ("foo.invalid", "invalid", True),
        ("invalid", "invalid", True),
        ("notinvalid", "invalid", False),
    ],
)
def test_is_under(name: str, suffix: str, expected: bool) -> None:
    assert is_under(name, suffix) is expected


def test_limits_match_rfc_1035() -> None:
    assert (MAX_NAME_LENGTH, MAX_LABEL_LENGTH) == (253, 63)
    assert len(LONGEST_NAME) == MAX_NAME_LENGTH


@pytest.mark.parametrize("raw", ["fe80::1%eth0", "[fe80::1%25eth0]"])
def test_normalize_host_rejects_any_ipv6_zone_id(raw: str) -> None:
    with pytest.raises(InvalidName, match="zone ID names a local interface"):
        normalize_host(raw)


@pytest.mark.parametrize("raw", ["[example.org]", "[1.2.3.4]"])
def test_normalize_host_rejects_brackets_around_non_ipv6(raw: str) -> None:
    with pytest.raises(InvalidName, match="only IPv6 literals go in brackets"):
        normalize_host(raw)
