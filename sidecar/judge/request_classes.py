"""How to answer a federation request to a gone server, by what the request is for.

Synapse reacts to the answer (docs/design.md §2): a 5xx on a request it can send to other
servers makes it try the next one and back off; a 4xx with a Matrix error reaches the
user who asked, with our text; a 410 on `/send` makes it back off at once instead of
retrying the transaction for minutes. The table is data: `--answer CLASS=STATUS` changes
a class's status.
"""

from __future__ import annotations

import re

FAILOVER = "failover"  # other servers can answer: a 5xx makes Synapse try the next one
USER = "user"  # one destination, a person waiting: a 4xx carrying the reason
SEND = "send"  # /send transactions: stop retrying, back off
WELL_KNOWN = "well_known"  # discovery: cache "no well-known"
OTHER = "other"

DEFAULT_STATUS = {FAILOVER: 502, USER: 410, SEND: 410, WELL_KNOWN: 410, OTHER: 502}

_FED = r"^/_matrix/federation/v\d+/"
TABLE: tuple[tuple[str, str], ...] = (
    (r"^/\.well-known/matrix/", WELL_KNOWN),
    (_FED + r"send/", SEND),
    (_FED + r"(make_join|send_join|make_leave|send_leave|make_knock|send_knock)/", FAILOVER),
    (_FED + r"(backfill|get_missing_events|state|state_ids|event|event_auth)/", FAILOVER),
    (_FED + r"media/(download|thumbnail)/", FAILOVER),
    (r"^/_matrix/media/v\d+/(download|thumbnail)/", FAILOVER),
    (_FED + r"(invite|exchange_third_party_invite)/", USER),
    (_FED + r"query/", USER),
    (_FED + r"user/(keys|devices)/", USER),
    (_FED + r"(publicRooms|hierarchy|openid)/?", USER),
    (r"^/_matrix/key/", FAILOVER),  # key fetches: Synapse falls back to notaries
)
_COMPILED = tuple((re.compile(pattern), cls) for pattern, cls in TABLE)
CLASSES = tuple(DEFAULT_STATUS)


def classify(path: str) -> str:
    for pattern, cls in _COMPILED:
        if pattern.match(path):
            return cls
    return OTHER


def parse_override(text: str) -> tuple[str, int]:
    """`user=404` → ("user", 404); ValueError names what is wrong."""
    cls, sep, status = text.partition("=")
    cls = cls.strip().lower()
    if not sep or cls not in DEFAULT_STATUS:
        raise ValueError(f"{text!r}: expected CLASS=STATUS with CLASS one of {', '.join(CLASSES)}")
    status = status.strip()
    # isdigit() alone admits '²' and other digits int() refuses: ASCII digits only
    if not (status.isascii() and status.isdigit()) or not 400 <= int(status) <= 599:
        raise ValueError(f"{text!r}: STATUS must be a number 400-599")
    return cls, int(status)
