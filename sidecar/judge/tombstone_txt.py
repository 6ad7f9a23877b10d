"""The TXT tombstone: `example.org. IN TXT "v=matrix;gone"` (proposed in synapse#3765).

Parsed tolerantly, as SPF-style records are in the wild: case, blanks around `;` and `=`,
a record split over several character-strings, and extra `key=value` fields are fine.
Any other TXT record at the name (SPF, site verification) is simply not a tombstone.
"""

from __future__ import annotations

from collections.abc import Iterable

TOMBSTONE_VERSION = "matrix"
TOMBSTONE_FLAG = "gone"
MAX_TXT_LENGTH = 4096  # longer text is not a tombstone record; do not spend time parsing it


def join_strings(strings: Iterable[bytes]) -> str:
    """Join the character-strings of one TXT record (RFC 7208 §3.3 style), decoding leniently."""
    return b"".join(strings).decode("utf-8", errors="replace")


def is_tombstone(text: str) -> bool:
    """True when one TXT record's text says `v=matrix` and carries the `gone` flag."""
    if len(text) > MAX_TXT_LENGTH:
        return False
    fields = [field.strip().lower() for field in text.split(";")]
    if not fields:
        return False
    key, sep, value = fields[0].partition("=")
    if not sep or key.strip() != "v" or value.strip() != TOMBSTONE_VERSION:
        return False
    for field in fields[1:]:
        key, sep, value = field.partition("=")
        if not sep and key.strip() == TOMBSTONE_FLAG:
            return True
    return False


def find_tombstone(records: Iterable[str]) -> str | None:
    """Return the first TXT text that is a tombstone, or None."""
    for text in records:
        if is_tombstone(text):
            return text
    return None
