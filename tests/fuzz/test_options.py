"""sidecar.config.options: option values from flags, the environment, YAML files and mitmproxy."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from sidecar.config.files import read_credentials
from sidecar.config.options import BY_NAME, OPTIONS, ConfigError, Option, Settings
from sidecar.config.sources import load_config_file
from sidecar.config.values import (
    DURATION_UNITS,
    MAX_DURATION_SECONDS,
    parse_bool,
    parse_duration,
    parse_int,
    parse_listen,
    parse_nameserver,
    parse_share,
    parse_size,
    parse_store,
    read_name_file,
    read_token_file,
)
from sidecar.dns.client import Nameserver
from sidecar.judge.names import Authority, is_ip_literal, normalize_host
from tests.fuzz.strategies import authorities, dns_names, hostish, json_values

REPO = Path(__file__).resolve().parents[2]
ANY_TEXT = st.one_of(st.text(max_size=80), st.text("0123456789.eE+-_ smhdSMHDinfa%", max_size=12))


def check_value_error(error: ValueError) -> None:
    assert str(error).strip(), f"{type(error).__name__} with an empty message"


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fuzz-options-") as name:
        yield Path(name)


def write(directory: Path, data: bytes, suffix: str = "") -> Path:
    fd, name = tempfile.mkstemp(dir=directory, suffix=suffix)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    return Path(name)


# -- single values --------------------------------------------------------------------------


@given(ANY_TEXT)
@example("nan")
@example("infs")
@example("1e308d")
@example("5e-324")
@example("1_0m")
@example("٣m")  # Arabic-Indic digit: float() takes it
def test_parse_duration_is_positive_and_finite_or_a_value_error(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ValueError as e:
        check_value_error(e)
        return
    assert 0 < seconds <= MAX_DURATION_SECONDS


@given(st.floats(min_value=0, exclude_min=True, allow_infinity=False), st.sampled_from("smhd"))
def test_parse_duration_reads_back_what_it_means(number: float, unit: str) -> None:
    expected = number * DURATION_UNITS[unit]
    assume(math.isfinite(expected) and expected > 0)
    if expected > MAX_DURATION_SECONDS:
        with pytest.raises(ValueError, match="longer than 3650d"):
            parse_duration(f"{number!r}{unit}")
        return
    assert parse_duration(f"{number!r}{unit}") == expected
    assert parse_duration(f" {number!r}{unit.upper()} ") == expected


@given(st.one_of(authorities(), ANY_TEXT))
@example("[::1]:0")
@example("localhost:1")
@example("0.0.0.0:65535")
def test_parse_listen_gives_an_ip_or_localhost_and_a_port(text: str) -> None:
    try:
        authority = parse_listen(text)
    except ValueError as e:
        check_value_error(e)
        return
    assert isinstance(authority, Authority)
    assert is_ip_literal(authority.host) or authority.host == "localhost"
    assert 1 <= authority.port <= 65535


@given(st.one_of(authorities(), ANY_TEXT))
def test_parse_nameserver_gives_an_ip_and_a_port(text: str) -> None:
    try:
        nameserver = parse_nameserver(text)
    except ValueError as e:
        check_value_error(e)
        return
    assert isinstance(nameserver, Nameserver)
    assert is_ip_literal(nameserver.address) and 1 <= nameserver.port <= 65535


@given(st.one_of(json_values, ANY_TEXT))
@example("nan%")
@example("1e-320")
@example("100%")
def test_parse_share_is_in_the_unit_interval(value: Any) -> None:
    try:
        share = parse_share(value)
    except ValueError as e:
        check_value_error(e)
        return
    assert 0 < share <= 1


@given(st.one_of(json_values, ANY_TEXT))
def test_parse_bool_is_a_bool(value: Any) -> None:
    try:
        result = parse_bool(value)
    except ValueError as e:
        check_value_error(e)
        return
    assert isinstance(result, bool)


@given(
    st.one_of(
        json_values,
        ANY_TEXT,
        st.builds(
            lambda s, h: f"{s}{h}",
            st.sampled_from(["redis://", "rediss://", "unix://"]),
            st.one_of(hostish, st.text(max_size=40)),
        ),
    )
)
@example("redis://[")
@example("redis://[::1")
@example("redis://:@/")
def test_parse_store_is_a_known_store(value: Any) -> None:
    try:
        store = parse_store(value)
    except ValueError as e:
        check_value_error(e)
        return
    assert store in ("memory", "sqlite") or store.startswith(("redis://", "rediss://", "unix://"))


@given(st.one_of(json_values, ANY_TEXT), st.integers(-1000, 1000), st.integers(0, 10**9))
@example(10**5000, 1, 10)
@example(" 1_000 ", 1, 10_000)
def test_parse_int_stays_in_bounds(value: Any, low: int, span: int) -> None:
    try:
        number = parse_int(value, low, low + span)
    except ValueError as e:
        check_value_error(e)
        return
    assert low <= number <= low + span


@given(st.one_of(json_values, ANY_TEXT), st.integers(0, 10**6), st.integers(0, 10**9))
@example(10**5000, 1, 10)
@example("64KiB", 1024, 10**6)
@example("-1k", 0, 10**6)
def test_parse_size_stays_in_bounds(value: Any, low: int, span: int) -> None:
    try:
        size = parse_size(value, low, low + span)
    except ValueError as e:
        check_value_error(e)
        return
    assert low <= size <= low + span


@given(st.integers(1, 10**6), st.sampled_from(["", "k", "K", "kb", "KiB", "m", "MB"]))
def test_parse_size_reads_back_what_it_means(number: int, unit: str) -> None:
    factor = {"": 1, "k": 1024, "m": 1024 * 1024}[unit[:1].lower()]
    assert parse_size(f"{number}{unit}", 0, 10**13) == number * factor


# -- Settings.from_raw --------------------------------------------------------------------------

PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "listen": st.sampled_from(["127.0.0.1:3128", "[::1]:1", "localhost:9", "0.0.0.0:0"]),
    "ops_listen": st.sampled_from(["", "127.0.0.1:9480", "[::1]:80"]),
    "nameserver": st.lists(st.sampled_from(["127.0.0.1", "::1", "10.0.0.1:5353"]), max_size=3),
    "deny": st.lists(dns_names(), max_size=3),
    "allow": st.lists(dns_names(), max_size=3),
    "allow_address": st.lists(st.sampled_from(["10.0.0.0/8", "::1", "fd00::/8"]), max_size=2),
    "suppress_status": st.integers(300, 700),
    "cache_size": st.integers(-1, 10**9),
    "store": st.sampled_from(["memory", "sqlite", "redis://127.0.0.1:1/0", "unix:///x"]),
    "breaker_failures": st.integers(-1, 1001),
    "breaker_max_share": st.sampled_from(["0%", "20%", "0.5", "1", "101%"]),
    "log_level": st.sampled_from(["debug", "INFO", " warning ", "error", "trace"]),
    "refusal": st.sampled_from(["close", "status", " STATUS ", "reset"]),
}
DURATIONS = st.one_of(
    st.sampled_from(["1s", "5m", "24h", "7d", "0", "-1s"]),
    st.floats(-1, 1e6),
    st.integers(-1, 10**6),
)


def option_values(option: Option) -> st.SearchStrategy[Any]:
    """Mostly plausible values (so validation gets deep), sometimes anything JSON-like."""
    if option.name in PLAUSIBLE:
        plausible = PLAUSIBLE[option.name]
    elif option.flag:
        plausible = st.sampled_from([True, False, "yes", "off", "1", "maybe"])
    elif option.metavar == "DURATION":
        plausible = DURATIONS
    else:  # files and directories: names that do not exist, relative to a scratch cwd
        plausible = st.sampled_from(["", "missing-file", "."])
    return st.one_of(plausible, plausible, json_values, ANY_TEXT)


raw_settings = st.fixed_dictionaries({}, optional={o.name: option_values(o) for o in OPTIONS})


@given(raw_settings)
@example({})
@example({"min_ttl": "1h", "max_ttl": "1m"})
@example({"ops_listen": None})
@example({"deny": {"a": 1}})
@example({"nameserver": b"\x00"})
def test_from_raw_gives_settings_or_a_config_error(raw: dict[str, Any]) -> None:
    try:
        settings = Settings.from_raw(raw)
    except ConfigError as e:
        assert str(e).startswith("--"), str(e)
        assert e.option in BY_NAME and e.problem.strip()
        assert str(e).startswith(BY_NAME[e.option].cli + ": ")
        return
    assert settings.min_ttl <= settings.max_ttl
    assert settings.breaker_min <= settings.breaker_max
    assert all(normalize_host(name) == name for name in settings.deny | settings.allow)


@pytest.mark.parametrize(
    "raw",
    [
        {"min_ttl": None},
        {"dns_timeout": True},
        {"listen": ["127.0.0.1:3128"]},
        {"ops_listen": {"host": "127.0.0.1"}},
        {"deny_file": ["a"]},
        {"ops_token_file": True},
    ],
    ids=[
        "min_ttl-null",
        "dns_timeout-true",
        "listen-list",
        "ops_listen-mapping",
        "deny_file-list",
        "ops_token_file-true",
    ],
)
def test_regression_from_raw_non_string_value_is_a_config_error(raw: dict[str, Any]) -> None:
    """YAML None/bool/list/mapping values reached parsers that call str methods or Path():
    AttributeError or TypeError escaped (e.g. `min_ttl:` left empty) and the CLI, which
    catches ConfigError only, printed a traceback."""
    with pytest.raises(ConfigError):
        Settings.from_raw(raw)


@pytest.mark.parametrize("name", ["deny", "log_level", "deny_file"])
def test_regression_from_raw_huge_int_is_a_config_error(name: str) -> None:
    """str() of an int over 4300 digits raises ValueError; outside check() it escaped bare."""
    with pytest.raises(ConfigError):
        Settings.from_raw({name: 10**5000})


# -- files: YAML config, name lists, tokens, credentials ----------------------------------------

yaml_keys = st.one_of(
    st.sampled_from([o.name for o in OPTIONS] + [o.name.replace("_", "-") for o in OPTIONS]),
    st.text(max_size=10),
)
yaml_scalars = st.one_of(
    st.sampled_from(
        [
            "",
            "~",
            "null",
            "true",
            "no",
            "0x1F",
            "0o17",
            "1_000",
            ".inf",
            "-.nan",
            "5m",
            "2001-12-14",
            "2001-12-14t21:59:43.10-05:00",
            "'quoted'",
            '"a\\tb"',
            "|\n  block",
            ">\n  folded",
            "&x 1",
            "*x",
            "!!str 1",
            "!!binary aGk=",
            "[a, b]",
            "{a: 1}",
            "- a",
            "? a",
            "@",
            "`",
            "%",
            "!local x",
        ]
    ),
    st.text(max_size=20),
    st.integers().map(str),
)


@st.composite
def yaml_documents(draw: st.DrawFn) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        indent = " " * draw(st.sampled_from([0, 0, 0, 2, 4]))
        lines.append(f"{indent}{draw(yaml_keys)}: {draw(yaml_scalars)}")
        if draw(st.booleans()):
            lines.extend(
                f"{indent}  - {draw(yaml_scalars)}" for _ in range(draw(st.integers(1, 3)))
            )
    text = "\n".join(lines)
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-16", "latin-1"]))
    return text.encode(encoding, errors="replace")


@given(st.one_of(st.binary(max_size=400), yaml_documents()))
@example(b"")
@example(b"- a\n- b\n")
@example(b"\xef\xbb\xbfmin_ttl: 5m\n")
@example(b"min-ttl: 1m\nmin_ttl: 2m\n")
@example(b"? [a, b]\n: 1\n")
@example(b"min_ttl: !!python/object:os.system x\n")
def test_load_config_file_gives_options_or_a_config_error(scratch: Path, data: bytes) -> None:
    path = write(scratch, data, ".yaml")
    try:
        try:
            raw = load_config_file(str(path))
        except ConfigError as e:
            assert str(e).startswith("--config: ") and e.problem.strip()
            return
    finally:
        path.unlink()
    assert isinstance(raw, dict) and set(raw) <= set(BY_NAME) - {"config"}
    cwd = Path.cwd()
    os.chdir(scratch)  # relative file options must not find anything real
    try:
        Settings.from_raw(raw)
    except ConfigError as e:
        assert str(e).startswith("--")
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize(
    "text",
    [
        "min_ttl: !!timestamp foo\n",
        "enforce: !!bool maybe\n",
        "min_ttl: !!int abc\n",
        "min_ttl: !!float abc\n",
        "min_ttl: 2001-02-30\n",
        "min_ttl: " + "1" * 4301 + "\n",
        "deny: " + "[" * 1000 + "\n",
    ],
    ids=["timestamp", "bool", "int", "float", "date", "huge-int", "deep"],
)
def test_regression_config_file_constructor_errors_are_config_errors(
    scratch: Path, text: str
) -> None:
    """PyYAML's SafeLoader raises AttributeError, KeyError, ValueError or RecursionError while
    constructing such values; load_config_file caught only yaml.YAMLError."""
    path = write(scratch, text.encode(), ".yaml")
    with pytest.raises(ConfigError, match=r"^--config: "):
        load_config_file(str(path))


LAUGHS = 8  # ten strings, nested eight times: 10**8 strings from a 564-byte file


def test_regression_config_alias_expansion_is_bounded(scratch: Path) -> None:
    """YAML aliases share one list many times over; from_raw str()'d such a value whole and
    ran out of memory instead of saying the option takes one value."""
    items = [f"  - &a0 [{', '.join(['aaaaaaaaaa'] * 10)}]"]
    items += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, LAUGHS)]
    config = write(
        scratch, ("allow:\n" + "\n".join(items) + f"\ndeny_file: *a{LAUGHS - 1}\n").encode()
    )
    program = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (256 << 20, 256 << 20))\n"
        "from sidecar.config.options import ConfigError, Settings\n"
        "from sidecar.config.sources import load_config_file\n"
        "try:\n"
        f"    Settings.from_raw(load_config_file({str(config)!r}))\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", program],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a 564-byte config file kept from_raw busy for over 5 s")
    assert result.returncode == 0, result.stderr[-300:]  # MemoryError at 256 MiB otherwise


@given(
    st.one_of(
        st.binary(max_size=600),
        st.lists(st.one_of(dns_names(), hostish, st.sampled_from(["# c", "", "  ", "a # b"]))).map(
            lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass")
        ),
    )
)
@example(b"\xff\xfe")
@example(b"example.org\r\nb.example # comment\n\n")
@example(b"a\x85b\n")  # NEL: a line break to str.splitlines
def test_read_name_file_gives_canonical_names_or_a_value_error(scratch: Path, data: bytes) -> None:
    path = write(scratch, data)
    try:
        names = read_name_file(str(path))
    except ValueError as e:
        check_value_error(e)
        assert str(path) in str(e)  # names the file
        return
    finally:
        path.unlink()
    assert all(normalize_host(name) == name for name in names)


valid_names = st.one_of(
    st.from_regex(
        r"([a-zA-Z0-9]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?\.){1,4}[a-zA-Z]{2,6}\.?", fullmatch=True
    ),
    st.sampled_from(["Bücher.Example", "例え.jp", "[2001:DB8::1]", "10.0.0.1", "::1"]),
)


@given(st.lists(valid_names, max_size=8), st.lists(st.sampled_from(["", "# x", "  # y"])))
def test_read_name_file_reads_back_the_names_written(
    scratch: Path, names: list[str], comments: list[str]
) -> None:
    expected = [normalize_host(name) for name in names]
    lines = [*(f"  {name}  # note" for name in names), *comments]
    path = write(scratch, "\n".join(lines).encode())
    try:
        assert read_name_file(str(path)) == tuple(expected)
    finally:
        path.unlink()


@given(st.one_of(st.binary(max_size=200), st.text(max_size=100).map(str.encode)))
@example(b"0123456789abcdef")
@example(b"0123456789abcde")
@example(b" 0123456789abcdef\n")
@example(b"0123456789 abcdef")
def test_read_token_file_gives_a_long_token_or_a_value_error(scratch: Path, data: bytes) -> None:
    path = write(scratch, data)
    try:
        token = read_token_file(str(path))
    except ValueError as e:
        check_value_error(e)
        return
    finally:
        path.unlink()
    assert len(token) >= 16 and not any(c.isspace() for c in token)
    assert token == data.decode().strip()


credential_text = st.text(
    st.characters(exclude_categories=["Cs", "Zs", "Zl", "Zp", "Cc"], exclude_characters=":#"),
    min_size=1,
    max_size=16,
)


@given(st.one_of(st.binary(max_size=400), st.text(max_size=200).map(str.encode)))
@example(b"user:pass\n")
@example(b"# only a comment\n")
@example(b"user:\n")
@example(b":pass\n")
def test_read_credentials_gives_users_or_a_value_error(scratch: Path, data: bytes) -> None:
    path = write(scratch, data)
    try:
        users = read_credentials(str(path))
    except ValueError as e:
        check_value_error(e)
        assert str(path) in str(e)
        return
    finally:
        path.unlink()
    assert users and all(user and password for user, password in users.items())


@given(st.dictionaries(credential_text, credential_text.map(lambda p: p + ":x"), min_size=1))
def test_read_credentials_reads_back_the_users_written(
    scratch: Path, users: dict[str, str]
) -> None:
    text = "# homeservers\n\n" + "\n".join(f"  {u}:{p}  " for u, p in users.items()) + "\n"
    path = write(scratch, text.encode())
    try:
        assert read_credentials(str(path)) == users
    finally:
        path.unlink()
