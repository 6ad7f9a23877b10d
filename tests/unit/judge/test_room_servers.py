"""The servers a send_join answer names: which names are taken, validated, bounded, and how
the parse yields to the event loop."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import pytest

from sidecar.judge import room_servers
from sidecar.judge.room_servers import RoomServers, Unreadable, decoded, room_of


def member(user: str, sender: str | None = None) -> dict[str, Any]:
    return {
        "type": "m.room.member",
        "state_key": user,
        "sender": sender or user,
        "content": {"membership": "join"},
    }


def parsed(body: object, skip: frozenset[str] = frozenset(), limit: int = 100) -> RoomServers:
    servers = RoomServers(json.dumps(body, indent=1), skip, limit)
    for _ in servers.slices():
        pass
    return servers


def test_v2_names_come_from_servers_in_room_members_and_senders_once_each() -> None:
    body = {
        "origin": "hub.test",
        "event": member("@me:hs.test"),
        "members_omitted": True,
        "servers_in_room": ["Hub.Test", "a.test", "b.test:8448", "a.test"],
        "state": [
            {"type": "m.room.create", "state_key": "", "sender": "@creator:c.test"},
            member("@u:d.test"),
            member("@v:E.test.", sender="@admin:f.test"),
        ],
        "auth_chain": [member("@w:g.test"), {"type": "m.room.power_levels", "origin": "h.test"}],
    }
    servers = parsed(body, skip=frozenset({"hub.test", "hs.test"}))
    assert servers.names == [
        "a.test",
        "b.test",
        "c.test",
        "d.test",
        "e.test",
        "f.test",
        "g.test",
        "h.test",
    ]
    assert (servers.invalid, servers.capped) == (0, False)


def test_v1_answer_is_read_too() -> None:
    assert parsed([200, {"state": [member("@u:a.test")], "auth_chain": []}]).names == ["a.test"]


def test_names_that_are_not_server_names_are_counted_not_taken() -> None:
    body = {
        "servers_in_room": ["ok.test", "bad name", "", 7, "-x.test", "a" * 300],
        "state": [member("no-at:x.test"), member("@nocolon"), {"type": "m.room.member"}],
    }
    servers = parsed(body)
    assert servers.names == ["ok.test"]
    # 5 servers_in_room items; 2 bad user IDs, each as state key and sender; absent: no name
    assert servers.invalid == 9


def test_ip_literals_are_not_taken_there_is_no_dns_to_ask() -> None:
    body = {"servers_in_room": ["1.2.3.4", "[2001:db8::1]:8448", "name.test"]}
    assert parsed(body).names == ["name.test"]


def test_at_most_limit_names_are_taken_and_the_parse_stops_there() -> None:
    body = {
        "servers_in_room": [f"s{i}.test" for i in range(50)],
        "state": "not reached: the parse stopped at the cap",
    }
    servers = parsed(body, limit=10)
    assert servers.names == [f"s{i}.test" for i in range(10)]
    assert servers.capped


def test_the_parse_yields_every_slice_of_events() -> None:
    state = [member(f"@u:s{i}.test") for i in range(3 * room_servers.EVENTS_PER_SLICE)]
    servers = RoomServers(json.dumps({"state": state}), limit=10_000)
    assert sum(1 for _ in servers.slices()) == 3
    assert len(servers.names) == len(state)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "nonsense",
        '{"state": [',
        '{"state": [{"type": "m.room.member"} {"x": 1}]}',
        "[500, {}]",
        '["x"]',
        '{"state" [] }',
    ],
)
def test_a_body_that_is_not_a_send_join_answer_is_unreadable(text: str) -> None:
    with pytest.raises(Unreadable):
        for _ in RoomServers(text).slices():
            pass


def test_names_taken_before_a_broken_tail_stay_taken() -> None:
    servers = RoomServers('{"servers_in_room": ["a.test", "b.test"], "state": [ {')
    with pytest.raises(Unreadable):
        for _ in servers.slices():
            pass
    assert servers.names == ["a.test", "b.test"]


def test_empty_answers_name_nobody() -> None:
    assert parsed({}).names == []
    assert parsed({"state": [], "servers_in_room": []}).names == []


def test_bodies_decode_from_gzip_and_deflate_within_the_limit() -> None:
    text = json.dumps({"servers_in_room": ["a.test"]})
    assert decoded(text.encode(), "") == text
    assert decoded(gzip.compress(text.encode()), "gzip") == text
    assert decoded(zlib.compress(text.encode()), "Deflate") == text
    bomb = gzip.compress(b" " * 100_000)
    with pytest.raises(Unreadable, match="larger than"):
        decoded(bomb, "gzip", limit=1000)
    with pytest.raises(Unreadable, match="larger than"):
        decoded(b" " * 1001, "", limit=1000)
    with pytest.raises(Unreadable, match="not read"):
        decoded(b"x", "br")
    with pytest.raises(Unreadable, match="does not decode"):
        decoded(b"not gzip", "gzip")
    with pytest.raises(Unreadable, match="UTF-8"):
        decoded(b"\xff\xfe", "")


def test_send_join_paths_and_only_those_name_a_room() -> None:
    assert room_of("/_matrix/federation/v2/send_join/!r%3Ahub.test/$e") == "!r%3Ahub.test"
    assert room_of("/_matrix/federation/v1/send_join/!r:hub.test/$e?omit_members=true") == (
        "!r:hub.test"
    )
    assert room_of("/_matrix/federation/v2/send_leave/!r:hub.test/$e") is None
    assert room_of("/_matrix/federation/v2/send_join/!r:hub.test") is None
    assert room_of("/_matrix/federation/v3/send_join/!r:hub.test/$e") is None
