"""sidecar.probe: the body `check --probe` reads from a well-known, chunked or not."""

from __future__ import annotations

import pytest

from sidecar.probe import _dechunk


def test_a_chunked_body_is_joined() -> None:
    wire = b'7\r\n{"m.ser\r\n15;ext=1\r\nver": "fed.test:443"}\r\n0\r\n\r\n'
    assert _dechunk(wire) == b'{"m.server": "fed.test:443"}'


def test_a_chunked_body_cut_short_keeps_what_arrived() -> None:
    assert _dechunk(b"5\r\nhello\r\n5\r\nwor") == b"hellowor"


def test_a_bad_chunk_size_is_an_error_not_a_body() -> None:
    with pytest.raises(ValueError, match="malformed chunked body"):
        _dechunk(b"zz\r\nhello\r\n")
