"""The servers a room names, read from a `send_join` response (issue 17: judge them early).

When a homeserver joins a room, the resident server's `send_join` answer lists the room:
`servers_in_room` (MSC3706 partial state) and/or the `state` and `auth_chain` events, whose
`m.room.member` state keys and senders name every server in it. The fan-out that follows
the join contacts all of them; judging them in the background first means that fan-out
meets cached verdicts. The names are hints, never evidence: each is validated as a server
name here and then judged by DNS like any other, so a lying or broken body costs DNS
questions (bounded by MAX_ROOM_SERVERS) and never a suppression.

Parsing is incremental: a 10,000-member room's full state is ~10 MB of JSON, and one
`json.loads` of it holds the event loop (and, in a thread, the GIL) ~100 ms. Here each
event is decoded on its own and `RoomServers.slices` yields every EVENTS_PER_SLICE events,
so the caller can let the event loop run between slices.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Generator, Iterator
from typing import Any

from sidecar.judge.names import InvalidName, is_ip_literal, parse_authority

# The largest public rooms span ~9,500-10,000 servers (#matrix:matrix.org). Each name
# taken costs one cold decision (5 DNS questions) unless it is cached already, so this
# bounds what one send_join can make the sidecar ask: 50,000 questions at most.
MAX_ROOM_SERVERS = 10_000
# The body is in memory already (intercept mode), but decoding and parsing it is ours:
# a full-state send_join of a 10,000-member room is ~10-20 MB; a larger one is skipped.
MAX_ROOM_BODY_BYTES = 64 * 1024 * 1024
# Events decoded between two yields: ~1 KB each, ~5 µs each, so a slice holds the event
# loop ~2-3 ms, well under one GIL switch interval's worth of other work waiting.
EVENTS_PER_SLICE = 250
# Room IDs and event IDs in the path: `/_matrix/federation/v1|v2/send_join/{room}/{event}`.
SEND_JOIN_PATH = re.compile(r"^/_matrix/federation/v[12]/send_join/([^/?]+)/[^/?]+(?:\?|$)")
# The keys of the answer whose arrays name servers; every other value is skipped whole.
_SERVER_ARRAYS = frozenset({"servers_in_room", "state", "auth_chain"})
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class Unreadable(ValueError):
    """A body that is not a send_join answer this module can read; the message says why."""


def room_of(path: str) -> str | None:
    """The (percent-encoded) room ID of a send_join request path, else None."""
    match = SEND_JOIN_PATH.match(path)
    return match.group(1) if match else None


def decoded(raw: bytes, encoding: str, limit: int = MAX_ROOM_BODY_BYTES) -> str:
    """The body as text: identity, gzip or deflate, at most `limit` bytes once decoded
    (a small compressed body must not expand without bound). Blocking: call it in a thread
    (zlib releases the GIL while it works)."""
    coding = encoding.strip().lower()
    if coding in ("", "identity"):
        body = raw
    elif coding in _CODINGS:
        inflater = zlib.decompressobj(_CODINGS[coding])
        try:
            body = inflater.decompress(raw, limit + 1)
        except zlib.error as e:
            raise Unreadable(f"{coding} body does not decode: {e}") from None
    else:
        raise Unreadable(f"content-encoding {coding[:40]!r} is not read")
    if len(body) > limit:
        raise Unreadable(f"body is larger than {limit} bytes")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Unreadable(f"body is not UTF-8: {e.reason}") from None


class RoomServers:
    """The distinct server names one send_join answer (v1 `[200, {...}]` or v2 `{...}`)
    names, in the order they appear, validated and normalized; at most `limit` of them.

    `skip` holds names not to take (the joining server itself, the resident server that
    answered). Call `slices()` to parse; `names` fills as it goes, `invalid` counts names
    that were not server names, `capped` says whether parsing stopped at the limit."""

    def __init__(
        self, text: str, skip: frozenset[str] = frozenset(), limit: int = MAX_ROOM_SERVERS
    ) -> None:
        self.text = text
        self.limit = limit
        self.names: list[str] = []
        self.invalid = 0
        self.capped = False
        self._seen = set(skip)

    def slices(self) -> Iterator[None]:
        """Parse, yielding every EVENTS_PER_SLICE array items; `Unreadable` if the body is
        not JSON of the expected shape (the names taken until then stay taken)."""
        try:
            yield from self._parse()
        except (ValueError, IndexError) as e:  # JSONDecodeError is a ValueError
            if isinstance(e, Unreadable):
                raise
            raise Unreadable(f"not a send_join answer: {str(e)[:120]}") from None

    def _parse(self) -> Generator[None, None, None]:
        text = self.text
        at = self._skip(0)
        if text.startswith("[", at):  # v1: [200, {...}]
            status, at = _DECODER.raw_decode(text, self._skip(at + 1))
            if status != 200:
                raise Unreadable(f"v1 answer with status {str(status)[:20]}")
            at = self._skip(self._expect(",", self._skip(at)))
        at = self._expect("{", at)
        if text.startswith("}", self._skip(at)):
            return
        while True:
            key, at = _DECODER.raw_decode(text, self._skip(at))
            at = self._skip(self._expect(":", self._skip(at)))
            if key in _SERVER_ARRAYS and text.startswith("[", at):
                at = yield from self._array(str(key), at + 1)
            else:
                _, at = _DECODER.raw_decode(text, at)  # a value that names nobody we need
            if self.capped:
                return
            at = self._skip(at)
            if text.startswith("}", at):
                return
            at = self._expect(",", at)

    def _array(self, key: str, at: int) -> Generator[None, None, int]:
        """Items of one array from `at` (just after its `[`); returns where it ended."""
        text = self.text
        at = self._skip(at)
        if text.startswith("]", at):
            return at + 1
        count = 0
        while True:
            item, at = _DECODER.raw_decode(text, at)
            self._take_from(key, item)
            if self.capped:
                return at
            count += 1
            if count % EVENTS_PER_SLICE == 0:
                yield
            at = self._skip(at)
            if text.startswith("]", at):
                return at + 1
            at = self._skip(self._expect(",", at))

    def _take_from(self, key: str, item: Any) -> None:
        if key == "servers_in_room":
            if isinstance(item, str):
                self._take(item)
            else:
                self.invalid += 1
            return
        if not isinstance(item, dict):
            return  # not an event: nothing to take from it
        if item.get("type") == "m.room.member":
            self._take_user(item.get("state_key"))
        self._take_user(item.get("sender"))
        origin = item.get("origin")
        if isinstance(origin, str):
            self._take(origin)

    def _take_user(self, user: Any) -> None:
        """The server part of a user ID, `@localpart:server.name[:port]`."""
        if isinstance(user, str) and user.startswith("@") and ":" in user:
            self._take(user.split(":", 1)[1])
        elif user is not None:
            self.invalid += 1

    def _take(self, raw: str) -> None:
        try:
            name = parse_authority(raw).host
        except InvalidName:
            self.invalid += 1
            return
        if name in self._seen or is_ip_literal(name):
            return  # an IP literal has no DNS to ask: its first connection decides
        if len(self.names) >= self.limit:
            self.capped = True
            return
        self._seen.add(name)
        self.names.append(name)

    def _skip(self, at: int) -> int:
        match = _WHITESPACE.match(self.text, at)
        return match.end() if match else at

    def _expect(self, char: str, at: int) -> int:
        if not self.text.startswith(char, at):
            found = self.text[at : at + 10]
            raise Unreadable(f"expected {char!r} at offset {at}, found {found!r}")
        return at + 1
