"""sidecar.config.options: every option validated once, every error naming its option."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from sidecar.config.options import BY_NAME, MITMPROXY, OPTIONS, ConfigError, RawOptions, Settings
from sidecar.config.sources import gather_raw, load_config_file
from sidecar.config.values import (
    parse_bool,
    parse_duration,
    parse_int,
    parse_listen,
    parse_nameserver,
    read_name_file,
)
from sidecar.dns.client import Nameserver
from sidecar.judge.names import Authority
from sidecar.remote.addresses import parse_network

# --- parse_duration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("300", 300.0),
        ("300s", 300.0),
        ("5m", 300.0),
        ("24h", 86400.0),
        ("7d", 604800.0),
        (" 5M ", 300.0),
        ("1H", 3600.0),
        ("0.5s", 0.5),
        ("1.5m", 90.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message_part"),
    [
        ("", "is not a duration"),
        ("   ", "is not a duration"),
        ("s", "is not a duration"),
        ("5x", "is not a duration"),
        ("m5", "is not a duration"),
        ("5 minutes", "is not a duration"),
        ("-1", "must be a positive duration"),
        ("-5m", "must be a positive duration"),
        ("0", "must be a positive duration"),
        ("0s", "must be a positive duration"),
        ("inf", "must be a positive duration"),
        ("infinity", "must be a positive duration"),
        ("nan", "must be a positive duration"),
        ("1e400", "must be a positive duration"),
        ("1e308d", "must be a positive duration"),
        ("3651d", "longer than 3650d"),
        ("1e300d", "longer than 3650d"),
    ],
)
def test_parse_duration_rejects(text: str, message_part: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message_part)) as excinfo:
        parse_duration(text)
    assert repr(text) in str(excinfo.value)


# --- parse_listen / parse_nameserver / parse_bool / parse_int --------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:3128", Authority("127.0.0.1", 3128)),
        ("0.0.0.0:8080", Authority("0.0.0.0", 8080)),
        ("[::1]:9480", Authority("::1", 9480)),
        ("[::]:3128", Authority("::", 3128)),
        ("localhost:3128", Authority("localhost", 3128)),
        ("LocalHost.:3128", Authority("localhost", 3128)),
    ],
)
def test_parse_listen(text: str, expected: Authority) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("text", "message_part"),
    [
        ("", "an address is required"),
        ("  ", "an address is required"),
        ("127.0.0.1", "has no port"),
        ("[::1]", "has no port"),
        ("example.org:3128", "'example.org' is not an IP address to listen on"),
        ("127.0.0.1:0", "outside 1-65535"),
        ("127.0.0.1:65536", "outside 1-65535"),
        ("127.0.0.1:http", "is not a number"),
        ("[::1:3128", "'[' without ']'"),
    ],
)
def test_parse_listen_rejects(text: str, message_part: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message_part)):
        parse_listen(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.1.1.1", Nameserver("1.1.1.1", 53)),
        ("127.0.0.1:5353", Nameserver("127.0.0.1", 5353)),
        ("[::1]:53", Nameserver("::1", 53)),
        ("[2001:4860:4860::8888]", Nameserver("2001:4860:4860::8888", 53)),
        ("2606:4700:4700::1111", Nameserver("2606:4700:4700::1111", 53)),
    ],
)
def test_parse_nameserver(text: str, expected: Nameserver) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize(
    ("text", "message_part"),
    [
        ("dns.google", "a nameserver must be an IP address"),
        ("dns.google:53", "a nameserver must be an IP address"),
        ("", "empty authority"),
        ("1.1.1.1:0", "outside 1-65535"),
        ("1.1.1.1:dns", "is not a number"),
    ],
)
def test_parse_nameserver_rejects(text: str, message_part: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message_part)):
        parse_nameserver(text)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        ("1", True),
        ("true", True),
        ("TRUE", True),
        (" yes ", True),
        ("On", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
        (1, True),
        (0, False),
    ],
)
def test_parse_bool(value: object, expected: bool) -> None:
    assert parse_bool(value) is expected


@pytest.mark.parametrize("value", ["", "maybe", "2", "enabled", None])
def test_parse_bool_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="is not true or false"):
        parse_bool(value)


def test_parse_int() -> None:
    assert parse_int(" 502 ", 400, 599) == 502
    assert parse_int(400, 400, 599) == 400
    with pytest.raises(ValueError, match="'abc' is not a whole number"):
        parse_int("abc", 1, 10)
    with pytest.raises(ValueError, match=re.escape("'5.0' is not a whole number")):
        parse_int("5.0", 1, 10)
    with pytest.raises(ValueError, match="11 is outside 1-10"):
        parse_int("11", 1, 10)


# --- read_name_file ---------------------------------------------------------------------------


def test_read_name_file(tmp_path: Path) -> None:
    path = tmp_path / "deny.txt"
    path.write_text(
        "# decommissioned servers\n"
        "\n"
        "Old.Example.ORG.\n"
        "   \n"
        "gone.example  # shut down 2024\n"
        "\tBücher.Example\r\n"
        "# trailing comment\n",
        encoding="utf-8",
    )
    assert read_name_file(str(path)) == (
        "old.example.org",
        "gone.example",
        "xn--bcher-kva.example",
    )


def test_read_name_file_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("# nothing yet\n\n", encoding="utf-8")
    assert read_name_file(str(path)) == ()


def test_read_name_file_reports_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "deny.txt"
    path.write_text("# header\nok.example\n\nbad name.example\nalso@bad\n", encoding="utf-8")
    with pytest.raises(ValueError) as excinfo:
        read_name_file(str(path))
    message = str(excinfo.value)
    assert message.startswith(f"{path} line 4: ")
    assert "contains ' '" in message


def test_read_name_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "missing.txt"
    message = f"cannot read {path}: No such file or directory"
    with pytest.raises(ValueError, match=re.escape(message)):
        read_name_file(str(path))


def test_read_name_file_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(f"cannot read {tmp_path}")):
        read_name_file(str(tmp_path))


def test_read_name_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("bücher.example\n".encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(f"{path} is not UTF-8 text")):
        read_name_file(str(path))


# --- Settings.from_raw ------------------------------------------------------------------------


def test_settings_defaults() -> None:
    settings = Settings.from_raw({})
    assert settings == Settings(
        listen=Authority("127.0.0.1", 3128),
        ops_listen=Authority("127.0.0.1", 9480),
        nameservers=(),
        dns_timeout=5.0,
        dns_max_stale=3600.0,
        min_ttl=300.0,
        max_ttl=86400.0,
        deny=frozenset(),
        allow=frozenset(),
        allow_addresses=(),
        enforce=True,
        suppress_status=502,
        refusal="close",
        cache_size=100_000,
        log_level="info",
        deny_file="",
        allow_file="",
        deny_flags=frozenset(),
        allow_flags=frozenset(),
        store="sqlite",
        state_dir="",
        ops_token=None,
        connect_timeout=30.0,
        breaker_failures=5,
        breaker_min=600.0,
        breaker_max=86400.0,
        breaker_max_share=0.2,
        require_dnssec=False,
        proxy_users=None,
        allow_open_proxy=False,
        reuse_port=False,
        shutdown_grace=20.0,
        probe=True,
        probe_interval=3600.0,
        probe_timeout=10.0,
        probe_concurrency=8,
        gone_ttl=86400.0,
        min_gone_ttl=86400.0,
        max_gone_ttl=90 * 86400.0,
        upstream_ca="",
        mode="passthrough",
        answer_status={"failover": 502, "user": 410, "send": 410, "well_known": 410, "other": 502},
    )


def test_settings_from_typical_raw_values() -> None:
    settings = Settings.from_raw(
        {
            "listen": "[::1]:3129",
            "ops_listen": "127.0.0.1:9999",
            "nameserver": ["1.1.1.1", "[::1]:5353"],
            "dns_timeout": "2s",
            "min_ttl": "1m",
            "max_ttl": "1h",
            "deny": ["Gone.Example."],
            "allow": ["Friend.Example"],
            "allow_address": ["10.0.0.0/8", "fd00::1"],
            "enforce": "false",
            "suppress_status": "503",
            "cache_size": "10",
            "log_level": " DEBUG ",
        }
    )
    assert settings.listen == Authority("::1", 3129)
    assert settings.ops_listen == Authority("127.0.0.1", 9999)
    assert settings.nameservers == (Nameserver("1.1.1.1", 53), Nameserver("::1", 5353))
    assert (settings.dns_timeout, settings.min_ttl, settings.max_ttl) == (2.0, 60.0, 3600.0)
    assert settings.deny == frozenset({"gone.example"})
    assert settings.allow == frozenset({"friend.example"})
    assert settings.allow_addresses == (parse_network("10.0.0.0/8"), parse_network("fd00::1"))
    assert settings.enforce is False
    assert settings.suppress_status == 503
    assert settings.cache_size == 10
    assert settings.log_level == "debug"


@pytest.mark.parametrize("ops", ["", "  ", None])
def test_empty_ops_listen_disables_it(ops: str | None) -> None:
    assert Settings.from_raw({"ops_listen": ops}).ops_listen is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("listen", "example.org:3128"),
        ("listen", "127.0.0.1"),
        ("ops_listen", "nope"),
        ("nameserver", ["1.1.1.1", "dns.google"]),
        ("nameserver", "1.1.1.1, dns.google"),
        ("dns_timeout", "0"),
        ("dns_timeout", "soon"),
        ("min_ttl", "-5m"),
        ("max_ttl", "forever"),
        ("deny", ["bad name.example"]),
        ("deny_file", "/nonexistent/tombstone-sidecar/deny.txt"),
        ("allow", "ok.example, -bad.example"),
        ("allow_address", ["10.0.0.0/33"]),
        ("allow_address", "banana"),
        ("enforce", "maybe"),
        ("suppress_status", "200"),
        ("suppress_status", "600"),
        ("suppress_status", "five hundred"),
        ("cache_size", "0"),
        ("cache_size", "lots"),
        ("log_level", "verbose"),
    ],
)
def test_each_bad_value_names_its_option(name: str, value: Any) -> None:
    with pytest.raises(ConfigError) as excinfo:
        Settings.from_raw({name: value})
    error = excinfo.value
    flag = "--" + name.replace("_", "-")
    assert str(error).startswith(f"{flag}: ")
    assert error.option == name
    assert str(error) == f"{flag}: {error.problem}"
    assert "\n" not in str(error)


@pytest.mark.parametrize("status", ["²", "٤١٠", "abc", "399", "600", ""])
def test_answer_status_must_be_plain_digits_400_599(status: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        Settings.from_raw({"answer": [f"user={status}"]})
    assert str(excinfo.value) == f"--answer: 'user={status}': STATUS must be a number 400-599"


def test_max_ttl_shorter_than_min_ttl_is_rejected() -> None:
    with pytest.raises(ConfigError) as excinfo:
        Settings.from_raw({"min_ttl": "1h", "max_ttl": "5m"})
    assert str(excinfo.value) == "--max-ttl: 5m is shorter than --min-ttl 1h"


def test_min_ttl_above_default_max_ttl_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"^--max-ttl: 24h is shorter than --min-ttl 2d$"):
        Settings.from_raw({"min_ttl": "2d"})


def test_equal_min_and_max_ttl_are_fine() -> None:
    settings = Settings.from_raw({"min_ttl": "1h", "max_ttl": "60m"})
    assert settings.min_ttl == settings.max_ttl == 3600.0


def test_deny_and_deny_file_are_merged(tmp_path: Path) -> None:
    deny_file = tmp_path / "deny.txt"
    deny_file.write_text("from-file.example\nBoth.Example\n", encoding="utf-8")
    settings = Settings.from_raw(
        {"deny": ["flag.example", "both.example."], "deny_file": str(deny_file)}
    )
    assert settings.deny == frozenset({"flag.example", "both.example", "from-file.example"})
    assert settings.deny_file == str(deny_file)


def test_bad_deny_file_line_is_reported_under_deny_file(tmp_path: Path) -> None:
    deny_file = tmp_path / "deny.txt"
    deny_file.write_text("ok.example\nnot/ok\n", encoding="utf-8")
    with pytest.raises(ConfigError) as excinfo:
        Settings.from_raw({"deny_file": str(deny_file)})
    assert str(excinfo.value).startswith(f"--deny-file: {deny_file} line 2: ")


@pytest.mark.parametrize(
    "value",
    [
        "a.example, b.example",
        "a.example,b.example",
        "a.example b.example",
        " a.example ,, b.example, ",
        ["a.example", "B.Example."],
        ("a.example", "b.example"),
    ],
)
def test_repeatable_options_accept_env_style_strings(value: Any) -> None:
    settings = Settings.from_raw({"deny": value, "allow": value})
    assert settings.deny == settings.allow == frozenset({"a.example", "b.example"})


def test_repeatable_nameserver_and_allow_address_from_strings() -> None:
    settings = Settings.from_raw(
        {"nameserver": "1.1.1.1, [::1]:5353", "allow_address": "127.0.0.0/8, ::1"}
    )
    assert settings.nameservers == (Nameserver("1.1.1.1", 53), Nameserver("::1", 5353))
    assert settings.allow_addresses == (parse_network("127.0.0.0/8"), parse_network("::1/128"))


@pytest.mark.parametrize("value", ["", None, []])
def test_empty_repeatable_is_empty(value: Any) -> None:
    assert Settings.from_raw({"deny": value}).deny == frozenset()


@pytest.mark.parametrize(
    ("yaml_text", "name", "seconds"),
    [
        ("max_ttl: 3600\n", "max_ttl", 3600.0),
        ("min_ttl: 10:00\n", "min_ttl", 600.0),
        ("dns_timeout: 2.5\n", "dns_timeout", 2.5),
    ],
)
def test_numeric_yaml_durations_are_seconds(
    tmp_path: Path, yaml_text: str, name: str, seconds: float
) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml_text, encoding="utf-8")
    raw = gather_raw({"config": str(config)}, environ={})
    assert getattr(Settings.from_raw(raw), name) == seconds


def test_yaml_typed_values_for_other_options(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        "enforce: false\nsuppress_status: 503\ncache_size: 1000\n"
        "deny: [a.example, b.example]\nnameserver: 1.1.1.1\n",
        encoding="utf-8",
    )
    settings = Settings.from_raw(gather_raw({"config": str(config)}, environ={}))
    assert settings.enforce is False
    assert settings.suppress_status == 503
    assert settings.cache_size == 1000
    assert settings.deny == frozenset({"a.example", "b.example"})
    assert settings.nameservers == (Nameserver("1.1.1.1", 53),)


# --- ConfigError ------------------------------------------------------------------------------


def test_config_error_text() -> None:
    error = ConfigError("min_ttl", "'x' is not a duration")
    assert str(error) == "--min-ttl: 'x' is not a duration"
    assert (error.option, error.problem) == ("min_ttl", "'x' is not a duration")
    assert isinstance(error, ValueError)
    elsewhere = ConfigError("min_ttl", "'x' is not a duration", "TOMBSTONE_MIN_TTL")
    assert str(elsewhere) == "TOMBSTONE_MIN_TTL: 'x' is not a duration"


def test_config_error_from_settings_for_mitmproxy() -> None:
    with pytest.raises(ConfigError) as excinfo:
        Settings.from_raw(RawOptions({"suppress_status": "200"}, fallback=MITMPROXY))
    assert str(excinfo.value) == "tombstone_suppress_status: 200 is outside 400-599"
    with pytest.raises(ConfigError) as excinfo:
        Settings.from_raw(RawOptions({"min_ttl": "1h", "max_ttl": "5m"}, fallback=MITMPROXY))
    assert str(excinfo.value) == "tombstone_max_ttl: 5m is shorter than tombstone_min_ttl 1h"


# --- option table -----------------------------------------------------------------------------


def test_option_spellings() -> None:
    option = BY_NAME["allow_address"]
    assert (option.cli, option.env, option.mitm) == (
        "--allow-address",
        "TOMBSTONE_ALLOW_ADDRESS",
        "tombstone_allow_address",
    )
    assert len({o.name for o in OPTIONS}) == len(OPTIONS)


# --- load_config_file -------------------------------------------------------------------------


def _write(tmp_path: Path, text: str, name: str = "sidecar.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_load_config_file_dash_and_underscore_keys(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "# sidecar config\n"
        "min-ttl: 10m\n"
        "max_ttl: 12h\n"
        "allow-address:\n  - 10.0.0.0/8\n"
        "enforce: false\n"
        "ops_listen: ''\n",
    )
    assert load_config_file(path) == {
        "min_ttl": "10m",
        "max_ttl": "12h",
        "allow_address": ["10.0.0.0/8"],
        "enforce": False,
        "ops_listen": "",
    }


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_load_config_file_empty(tmp_path: Path, text: str) -> None:
    assert load_config_file(_write(tmp_path, text)) == {}


@pytest.mark.parametrize(
    ("text", "message_part"),
    [
        (
            "min_ttl: 5m\nmin_tll: 10m\n",
            " line 2: unknown option 'min_tll' (did you mean min_ttl?)",
        ),
        ("config: other.yaml\n", " line 1: unknown option 'config'"),
        ("Min_TTL: 5m\n", " line 1: unknown option 'Min_TTL'"),
        ("- min_ttl\n- 5m\n", " must be a mapping of option: value"),
        ("just a string\n", " must be a mapping of option: value"),
        ("42\n", " must be a mapping of option: value"),
    ],
)
def test_load_config_file_rejects(tmp_path: Path, text: str, message_part: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        load_config_file(path)
    assert str(excinfo.value) == f"--config: {path}{message_part}"
    assert excinfo.value.option == "config"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("min_ttl: 5m\nmax_ttl: 1h\n  oops: x\n", 3),
        ("\tmin_ttl: 5m\n", 1),
        ("min_ttl: 5m\ndeny: [a.example\n", 3),
    ],
)
def test_load_config_file_bad_yaml_names_the_line(tmp_path: Path, text: str, line: int) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        load_config_file(path)
    message = str(excinfo.value)
    assert message.startswith(f"--config: {path} line {line} is not valid YAML: ")
    assert "\n" not in message


def test_load_config_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"^--config: cannot read .*nope\.yaml: No such file"):
        load_config_file(str(path))


def test_load_config_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("deny: bücher.example\n".encode("latin-1"))
    with pytest.raises(ConfigError) as excinfo:
        load_config_file(str(path))
    assert excinfo.value.option == "config"


# --- gather_raw -------------------------------------------------------------------------------


def _no_flags(**given: Any) -> dict[str, Any]:
    """What argparse hands over: every option present, None unless given."""
    flags: dict[str, Any] = {o.name: None for o in OPTIONS}
    flags.update(given)
    return flags


def test_gather_raw_precedence_flag_env_file_default(tmp_path: Path) -> None:
    config = _write(
        tmp_path,
        "min_ttl: 1m\nmax_ttl: 1h\ndns_timeout: 3s\ndeny: [file.example]\n",
    )
    environ = {
        "TOMBSTONE_MIN_TTL": "2m",
        "TOMBSTONE_MAX_TTL": "2h",
        "TOMBSTONE_DENY": "env.example",
        "UNRELATED": "x",
    }
    raw = gather_raw(_no_flags(config=config, min_ttl="3m"), environ=environ)
    assert raw["min_ttl"] == "3m"  # flag beats env and file
    assert raw["max_ttl"] == "2h"  # env beats file
    assert raw["deny"] == "env.example"  # env beats file for repeatables too
    assert raw["dns_timeout"] == "3s"  # file beats default
    assert "cache_size" not in raw  # nothing given: from_raw uses the default
    settings = Settings.from_raw(raw)
    assert (settings.min_ttl, settings.max_ttl, settings.dns_timeout) == (180.0, 7200.0, 3.0)
    assert settings.deny == frozenset({"env.example"})
    assert settings.cache_size == 100_000


def test_gather_raw_config_path_from_env(tmp_path: Path) -> None:
    config = _write(tmp_path, "log_level: warning\n")
    raw = gather_raw(_no_flags(), environ={"TOMBSTONE_CONFIG": config})
    assert raw["log_level"] == "warning"


def test_gather_raw_config_flag_beats_env_config(tmp_path: Path) -> None:
    from_flag = _write(tmp_path, "log_level: error\n", "flag.yaml")
    from_env = _write(tmp_path, "log_level: debug\n", "env.yaml")
    raw = gather_raw(_no_flags(config=from_flag), environ={"TOMBSTONE_CONFIG": from_env})
    assert raw["log_level"] == "error"


def test_gather_raw_false_flag_still_wins() -> None:
    raw = gather_raw(_no_flags(enforce=False), environ={"TOMBSTONE_ENFORCE": "true"})
    assert raw["enforce"] is False
    assert Settings.from_raw(raw).enforce is False


def test_gather_raw_empty_env_value_overrides_file(tmp_path: Path) -> None:
    config = _write(tmp_path, "ops_listen: 127.0.0.1:9999\n")
    raw = gather_raw(_no_flags(config=config), environ={"TOMBSTONE_OPS_LISTEN": ""})
    assert Settings.from_raw(raw).ops_listen is None


def test_gather_raw_nothing_given() -> None:
    assert gather_raw({}, environ={}) == {}
    assert gather_raw(_no_flags(), environ={}) == {}


def test_gather_raw_bad_config_file_is_a_config_error(tmp_path: Path) -> None:
    config = _write(tmp_path, "bogus: 1\n")
    with pytest.raises(ConfigError, match="unknown option 'bogus'"):
        gather_raw(_no_flags(), environ={"TOMBSTONE_CONFIG": config})


def test_load_config_file_rejects_both_spellings_of_one_key(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("min-ttl: 5m\nmin_ttl: 10m\n")
    with pytest.raises(ConfigError, match="given twice"):
        load_config_file(str(config))
