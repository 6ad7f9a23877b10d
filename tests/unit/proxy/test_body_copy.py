"""A send_join answer streams through BodyCopy unchanged; the copy is bounded."""

from __future__ import annotations

import pytest

from sidecar.judge.room_servers import Unreadable
from sidecar.proxy.requests import BodyCopy


def test_every_chunk_passes_unchanged_and_the_copy_is_whole() -> None:
    copy = BodyCopy(limit=10)
    assert [copy(c) for c in (b"abc", b"def", b"")] == [b"abc", b"def", b""]
    assert copy.body() == b"abcdef"


def test_a_body_over_the_limit_still_passes_but_is_not_kept() -> None:
    copy = BodyCopy(limit=10)
    assert [copy(c) for c in (b"123456", b"789012", b"345")] == [b"123456", b"789012", b"345"]
    assert copy.chunks == []  # nothing held for a body that will not be read
    with pytest.raises(Unreadable, match="larger than 10 bytes"):
        copy.body()
