"""sidecar.judge.tombstone_txt: TXT record text from any zone on the internet."""

from __future__ import annotations

from hypothesis import assume, example, given
from hypothesis import strategies as st

from sidecar.judge.tombstone_txt import (
    MAX_TXT_LENGTH,
    find_tombstone,
    is_tombstone,
    join_strings,
)

BLANKS = " \t\n\r\x0b\x0c\xa0\u2003"  # everything str.strip() removes, ASCII or not
blank = st.text(BLANKS, max_size=3)
# SPF-like extra fields: keys and values without ';' (which separates fields).
keys = st.text(st.characters(exclude_characters=";=", exclude_categories=["Cs"]), max_size=12)
values = st.text(st.characters(exclude_characters=";", exclude_categories=["Cs"]), max_size=12)
extra_fields = st.lists(st.tuples(keys, st.one_of(st.none(), values)), max_size=4).map(
    lambda fields: [k if v is None else f"{k}={v}" for k, v in fields]
)


def any_case(draw: st.DrawFn, word: str) -> str:
    return "".join(c.upper() if draw(st.booleans()) else c for c in word)


@st.composite
def tombstones(draw: st.DrawFn) -> str:
    """`v=matrix;gone` in any case and spacing, with extra fields anywhere after the first."""
    first = (
        f"{draw(blank)}{any_case(draw, 'v')}{draw(blank)}={draw(blank)}"
        f"{any_case(draw, 'matrix')}{draw(blank)}"
    )
    gone = f"{draw(blank)}{any_case(draw, 'gone')}{draw(blank)}"
    before, after = draw(extra_fields), draw(extra_fields)
    return ";".join([first, *before, gone, *after]) + draw(st.sampled_from(["", ";", "; "]))


@given(st.text(max_size=5000))
@example("v=matrix;" + "x" * MAX_TXT_LENGTH + ";gone")
def test_is_tombstone_never_raises(text: str) -> None:
    assert isinstance(is_tombstone(text), bool)


@given(tombstones())
@example("v=matrix;gone")
@example(" V = MATRIX ; GONE ")
@example("v=matrix;gone;")
@example("v=matrix; reason=shut down ;gone")
def test_valid_tombstones_in_any_case_and_spacing_are_found(text: str) -> None:
    assume(len(text) <= MAX_TXT_LENGTH)
    assert is_tombstone(text), text


@given(tombstones())
def test_tombstone_split_over_character_strings_is_found(text: str) -> None:
    assume(len(text) <= MAX_TXT_LENGTH)
    raw = text.encode()
    cuts = sorted({len(raw) * i // 4 for i in range(1, 4)})
    strings = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    assert find_tombstone([join_strings(strings)]) == text


@given(st.text(max_size=500))
@example("v=matrix")  # no gone flag
@example("v=matrix;gone=yes")  # a key=value, not the bare flag
@example("v=matrix gone")
@example("v=matrixx;gone")
@example("v=spf1;gone")
@example("x=matrix;gone")
@example("gone;v=matrix")
def test_text_without_a_v_matrix_first_field_and_gone_flag_is_not_a_tombstone(
    text: str,
) -> None:
    fields = text.split(";")
    first = fields[0].replace("=", " = ", 1).split()
    has_version = [word.lower() for word in first] == ["v", "=", "matrix"]
    has_flag = any(field.strip().lower() == "gone" for field in fields[1:])
    if not (has_version and has_flag) or len(text) > MAX_TXT_LENGTH:
        assert not is_tombstone(text), text


@given(st.lists(st.binary(max_size=300), max_size=20))
@example([b"\xff\xfe", b"v=matrix;gone"])
@example([b"v=ma", b"trix;g", b"one"])
def test_join_strings_never_raises_and_decodes_leniently(strings: list[bytes]) -> None:
    text = join_strings(strings)
    assert isinstance(text, str)
    assert len(text) <= sum(len(s) for s in strings)  # one character per byte at most
    if all(s.isascii() for s in strings):
        assert text == b"".join(strings).decode("ascii")


@given(st.lists(st.one_of(st.text(max_size=100), tombstones()), max_size=20))
def test_find_tombstone_returns_the_first_tombstone(records: list[str]) -> None:
    found = find_tombstone(records)
    tombstone_texts = [r for r in records if is_tombstone(r)]
    assert found == (tombstone_texts[0] if tombstone_texts else None)
