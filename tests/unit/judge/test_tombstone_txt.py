"""sidecar.judge.tombstone_txt: the TXT `v=matrix;gone` record, parsed as tolerantly as SPF."""

from __future__ import annotations

import pytest

from sidecar.judge.tombstone_txt import MAX_TXT_LENGTH, find_tombstone, is_tombstone, join_strings


@pytest.mark.parametrize(
    "text",
    [
        "v=matrix;gone",
        "v=matrix; gone",
        "v=matrix ; gone",
        " v = matrix ; gone ",
        "\tv=matrix;\tgone\t",
        "V=MATRIX;GONE",
        "v=Matrix;Gone",
        "v=matrix;gone;",
        "v=matrix; gone; successor=new.example",
        "v=matrix; successor=new.example; gone",
        "v=matrix; reason = shut down; gone",
        "v=matrix;;gone",
    ],
)
def test_tombstones(text: str) -> None:
    assert is_tombstone(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        ";",
        "v=spf1 -all",
        "v=spf1 include:_spf.example.org ~all",
        "google-site-verification=abcdefghijklmnopqrstuvwxyz0123456789",
        "v=matrix",
        "v=matrix;",
        "v=matrix; successor=new.example",
        "gone",
        "gone; v=matrix",
        "v=matrixx;gone",
        "v=matri;gone",
        "v=matrix2;gone",
        "v matrix;gone",
        "v=;gone",
        "x=matrix;gone",
        "vv=matrix;gone",
        "v=matrix;gone=true",
        "v=matrix;gone=",
        "v=matrix;not gone",
        "v=matrix;gonee",
        "v=matrix;g one",
        "v=matrix,gone",
        "v=matrix gone",
    ],
)
def test_not_tombstones(text: str) -> None:
    assert not is_tombstone(text)


def test_length_limit_is_inclusive() -> None:
    record = "v=matrix;gone;"
    at_limit = record + "x" * (MAX_TXT_LENGTH - len(record))
    assert len(at_limit) == MAX_TXT_LENGTH
    assert is_tombstone(at_limit)
    assert not is_tombstone(at_limit + "x")


def test_oversized_text_is_not_a_tombstone() -> None:
    assert not is_tombstone("v=matrix;gone;" + " " * MAX_TXT_LENGTH)
    assert not is_tombstone("v=matrix;gone" + ";" * 100_000)


@pytest.mark.parametrize(
    ("strings", "text"),
    [
        ([b"v=matrix;gone"], "v=matrix;gone"),
        ([b"v=matrix;", b"gone"], "v=matrix;gone"),
        ([b"v=mat", b"rix;go", b"ne"], "v=matrix;gone"),
        ([b"v=matrix; ", b"", b" gone"], "v=matrix;  gone"),
        ([], ""),
        ([b"caf\xc3\xa9"], "café"),
    ],
)
def test_join_strings(strings: list[bytes], text: str) -> None:
    assert join_strings(strings) == text


def test_split_record_joined_is_a_tombstone() -> None:
    assert is_tombstone(join_strings([b"v=matrix;", b"gone"]))
    assert is_tombstone(join_strings(iter([b"V=Matrix ;", b" GONE"])))


@pytest.mark.parametrize(
    ("strings", "tombstone"),
    [
        ([b"\xff\xfe\xfd"], False),
        ([b"v=matrix;\xff", b"gone"], False),
        ([b"\xc3", b"v=matrix;gone"], False),
        ([b"v=matrix;gone;note=\xff\xfe"], True),
        ([b"v=matrix;gone;\xc3"], True),
    ],
)
def test_invalid_utf8_does_not_crash(strings: list[bytes], tombstone: bool) -> None:
    text = join_strings(strings)
    assert "\ufffd" in text
    assert is_tombstone(text) is tombstone


def test_find_tombstone_returns_the_first_tombstone() -> None:
    records = [
        "v=spf1 -all",
        "google-site-verification=xyz",
        "V=MATRIX; GONE",
        "v=matrix;gone",
    ]
    assert find_tombstone(records) == "V=MATRIX; GONE"


@pytest.mark.parametrize(
    "records",
    [
        [],
        ["v=spf1 -all"],
        ["v=matrix", "gone"],
        ["v=matrixx;gone", "google-site-verification=xyz"],
    ],
)
def test_find_tombstone_none(records: list[str]) -> None:
    assert find_tombstone(records) is None


def test_find_tombstone_accepts_any_iterable() -> None:
    records = (text for text in ["v=spf1 -all", "v=matrix;gone"])
    assert find_tombstone(records) == "v=matrix;gone"
