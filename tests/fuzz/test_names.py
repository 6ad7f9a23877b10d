"""sidecar.judge.names: CONNECT authorities, SNI and Host values from the outside world."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from sidecar.judge.names import (
    MAX_LABEL_LENGTH,
    MAX_NAME_LENGTH,
    Authority,
    InvalidName,
    is_ip_literal,
    normalize_host,
    parse_authority,
)
from tests.fuzz.strategies import MAX_NAME_MESSAGE, authorities, hostish, ipv6_spellings

CANONICAL_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


def check_rejection(error: InvalidName, raw: str, *parts: str) -> None:
    """The message is one readable line that names the input it rejects (or the part of
    it that is wrong: the host of an authority)."""
    message = str(error)
    assert message.strip(), f"empty message for {raw!r}"
    if message.startswith("empty"):  # "empty name": nothing to quote
        return
    runs = [re.search(r"[A-Za-z0-9]{1,6}", text[:80]) for text in (raw, *parts)]
    named = [run is None or run.group() in message for run in runs]  # None: nothing to find
    assert any(named), f"{message!r} does not name the input {raw!r}"


def check_canonical(name: str) -> None:
    assert len(name) <= MAX_NAME_LENGTH, name
    if is_ip_literal(name):
        assert name == str(ipaddress.ip_address(name)), f"{name!r} is not in compressed form"
        return
    assert name.isascii() and CANONICAL_NAME.fullmatch(name), f"{name!r} is not canonical"
    for label in name.split("."):
        assert len(label) <= MAX_LABEL_LENGTH, name
        assert not label.startswith("-") and not label.endswith("-"), name


@given(st.one_of(hostish, st.text()))
@example("\uff11.\uff12.\uff13.\uff14")  # fullwidth digits: IDNA turns them into an IPv4 literal
@example("a\u3002b")  # an ideographic full stop inside one label
@example("[::ffff:1.2.3.4]")
@example("\u00ad")  # a label IDNA maps to nothing
def test_normalize_host_is_a_canonical_fixed_point(raw: str) -> None:
    try:
        name = normalize_host(raw)
    except InvalidName as e:
        check_rejection(e, raw)
        return
    check_canonical(name)
    assert normalize_host(name) == name
    assert normalize_host(name.upper()) == name  # case never matters
    if ":" not in name:  # a DNS name or IPv4 literal may carry blanks and a trailing dot
        assert normalize_host(f" {name}.\n") == name


@given(st.one_of(hostish, st.text(min_size=200, max_size=3000)))
@example("a" * 5000)
@example("[" + "a" * 5000)
@example("é" * 5000)
@example("\x7f" * 63 + "." + "\x80" * 100)  # escaped by repr: 4 characters each
def test_normalize_host_error_messages_are_bounded(raw: str) -> None:
    try:
        normalize_host(raw)
    except InvalidName as e:
        assert len(str(e)) <= MAX_NAME_MESSAGE, f"{len(str(e))}-character message"


@pytest.mark.parametrize("raw", ["1:" + "a" * 5000, "é" * 5000], ids=["ipv6", "idna"])
def test_regression_error_message_is_bounded(raw: str) -> None:
    """Found by the property above: the IPv6 branch ({raw!r}, and ipaddress's message that
    repeats it) and the IDNA branch ({label!r}) quoted the input whole, so the message (400
    body, log line) grew with the input."""
    with pytest.raises(InvalidName) as caught:
        normalize_host(raw)
    assert len(str(caught.value)) <= MAX_NAME_MESSAGE


@given(
    st.lists(
        st.from_regex(r"[a-zA-Z0-9_]([a-zA-Z0-9_-]{0,61}[a-zA-Z0-9_])?", fullmatch=True),
        min_size=1,
        max_size=8,
    ),
    st.booleans(),
    st.sampled_from(["", " ", "\t", "\n ", "\r\n"]),
)
def test_valid_ascii_names_normalize_to_their_lowercase(
    labels: list[str], trailing_dot: bool, blank: str
) -> None:
    name = ".".join(labels)
    assume(len(name) <= MAX_NAME_LENGTH)
    raw = f"{blank}{name}{'.' if trailing_dot else ''}{blank}"
    assert normalize_host(raw) == name.lower()


@given(ipv6_spellings)
def test_ipv6_literals_take_their_compressed_form(raw: str) -> None:
    assert normalize_host(raw) == str(ipaddress.IPv6Address(raw.strip("[]")))


@given(st.one_of(authorities(), st.text()))
@example("[::1]:")
@example("host:")
@example("[::1]x")
@example(":443")
@example("a:00443")
@example("a:٤٤٣")  # Arabic-Indic digits are digits to str.isdigit, not to a port
def test_parse_authority_gives_a_port_in_range_and_a_canonical_host(raw: str) -> None:
    try:
        authority = parse_authority(raw)
    except InvalidName as e:
        check_rejection(e, raw, raw.strip().partition(":")[0])
        return
    assert 1 <= authority.port <= 65535
    check_canonical(authority.host)
    assert normalize_host(authority.host) == authority.host
    assert parse_authority(str(authority)) == authority  # str() is a round trip


@given(st.one_of(authorities(), st.text()), st.integers(1, 65535))
def test_parse_authority_default_port_only_when_none_is_given(raw: str, default: int) -> None:
    try:
        authority = parse_authority(raw, default_port=default)
    except InvalidName:
        return
    if authority.port != default:
        assert ":" in raw  # a port other than the default was written out


@given(st.from_type(Authority).filter(lambda a: 0 < a.port < 65536))
def test_authority_str_never_breaks_the_parser(authority: Authority) -> None:
    try:
        parse_authority(str(authority))
    except InvalidName as e:
        assert str(e).strip()
