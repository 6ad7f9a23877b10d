"""Headers from remote servers and federation requests: X-Matrix, Cache-Control/Expires on a
410, and the --answer CLASS=STATUS overrides (sidecar/xmatrix.py, gone_http.py,
request_classes.py)."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from sidecar.judge import gone_http, request_classes
from sidecar.judge.ttl import TtlBounds
from sidecar.proxy import xmatrix

TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~:[]"
param_names = st.text(TOKEN_CHARS, min_size=1, max_size=12)
param_values = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def xmatrix_headers(draw: st.DrawFn) -> tuple[str, dict[str, str]]:
    params = draw(st.dictionaries(param_names.map(str.lower), param_values, max_size=5))
    scheme = draw(st.sampled_from(["X-Matrix", "x-matrix", "X-MATRIX"]))
    separator = draw(st.sampled_from([",", ", ", " ,\t", ",,"]))
    parts = [f"{name}={quote(value)}" for name, value in params.items()]
    return f"{scheme} {separator.join(parts)}", params


headers = st.one_of(
    st.text(max_size=200),
    st.builds(lambda rest: "X-Matrix " + rest, st.text(max_size=200)),
    st.builds(lambda rest: "X-Matrix " + rest, st.text(TOKEN_CHARS + '=," \\\t', max_size=80)),
)


@given(headers)
@example('X-Matrix destination="unterminated')
@example('X-Matrix destination="a\\')
@example("X-Matrix =x")
@example("X-Matrix a=b=c")
@example("X-Matrix " + "a=b," * 3000)
def test_xmatrix_parse_gives_parameters_or_an_xmatrix_error(header: str) -> None:
    try:
        params = xmatrix.parse(header)
    except xmatrix.XMatrixError as e:
        assert str(e).strip() and len(str(e)) < 200, str(e)
        return
    assert all(name and name == name.lower() for name in params)


@given(xmatrix_headers())
@example(
    (
        'X-Matrix origin="a.example",destination="b.example"',
        {"origin": "a.example", "destination": "b.example"},
    )
)
def test_xmatrix_parse_reads_back_quoted_parameters(case: tuple[str, dict[str, str]]) -> None:
    header, params = case
    assume(len(header) <= xmatrix.MAX_HEADER)
    assert xmatrix.parse(header) == params
    assert xmatrix.destination(header) == (params.get("destination") or None)


@given(st.one_of(st.none(), headers))
def test_xmatrix_destination_is_a_string_none_or_an_xmatrix_error(header: str | None) -> None:
    try:
        found = xmatrix.destination(header)
    except xmatrix.XMatrixError:
        return
    assert found is None or (isinstance(found, str) and found)


@pytest.mark.parametrize(
    ("header", "params"),
    [
        ('X-Matrix origin="a",destination="b"', {"origin": "a", "destination": "b"}),
        ('X-Matrix a = "x\\"y" ,, b=tok', {"a": 'x"y', "b": "tok"}),
        ('X-Matrix a="b,c"', {"a": "b,c"}),
        ("X-Matrix a=", {"a": ""}),
        ("X-Matrix origin=a destination=b", None),  # Synapse splits at commas only
        ('X-Matrix a="unterminated', None),
        ('X-Matrix a="b"x', None),
        ("X-Matrix a=b=c", None),
        ("X-Matrix novalue", None),
        ('X-Matrix "a"=b', None),
    ],
)
def test_xmatrix_parse_known_headers(header: str, params: dict[str, str] | None) -> None:
    """The readings the stdlib list splitter must keep (None: an XMatrixError)."""
    if params is None:
        with pytest.raises(xmatrix.XMatrixError):
            xmatrix.parse(header)
    else:
        assert xmatrix.parse(header) == params


TTL = TtlBounds(default=86400.0, minimum=3600.0, maximum=30 * 86400.0)
cache_controls = st.one_of(
    st.text(max_size=60),
    st.builds(
        lambda n, q: f"public, max-age={q}{n}{q}",
        st.integers(0, 10**12),
        st.sampled_from(["", '"']),
    ),
)
expires = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        [
            "Wed, 21 Oct 2015 07:28:00 GMT",
            "0",
            "-1",
            "Thu, 01 Jan 1970 00:00:00 GMT",
            "Fri, 31 Dec 9999 23:59:59 GMT",
            "Mon, 32 Foo 2015 99:99:99 XYZ",
            "Sun, 06 Nov 1994 08:49:37 +9999",
        ]
    ),
)


@given(
    st.dictionaries(
        st.sampled_from(["cache-control", "Cache-Control", "expires", "Expires", "x"]),
        st.one_of(cache_controls, expires),
        max_size=3,
    ),
    st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)),
)
@example({"Expires": "Fri, 31 Dec 9999 23:59:59 GMT"}, None)
@example({"expires": "Sun, 06 Nov 1994 08:49:37 +9999"}, 0.0)
@example({"cache-control": "max-age=9999999999"}, None)
def test_gone_lifetime_is_clamped_and_never_raises(
    headers: dict[str, str], now: float | None
) -> None:
    seconds = gone_http.lifetime(headers, TTL, now)
    assert math.isfinite(seconds) and TTL.minimum <= seconds <= TTL.maximum


@given(
    st.one_of(
        st.text(max_size=40),
        st.builds(
            lambda c, s: f"{c}={s}",
            st.sampled_from([*request_classes.CLASSES, "USER", " send ", "x"]),
            st.one_of(st.integers(-1, 1000).map(str), st.text(max_size=6)),
        ),
    )
)
@example("user=٤٠٤")  # Arabic-Indic digits
@example("user=²")  # a digit to str.isdigit, not to int()
@example("user=" + "9" * 5000)
def test_answer_override_gives_a_class_and_a_status_or_a_value_error(text: str) -> None:
    try:
        cls, status = request_classes.parse_override(text)
    except ValueError as e:
        assert str(e).strip()
        return
    assert cls in request_classes.CLASSES and 400 <= status <= 599
