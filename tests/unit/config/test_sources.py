"""Where a value came from: errors name the flag, the TOMBSTONE_* variable, or the file and
line; names that are no option are errors wherever they appear."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.config.options import MITMPROXY, ConfigError, RawOptions, Settings
from sidecar.config.sources import check_environment, gather_raw, load_config_file


def settings(flags: dict[str, Any], environ: dict[str, str], command: str = "run") -> Settings:
    return Settings.from_raw(gather_raw(flags, environ, command), command)


def error(flags: dict[str, Any], environ: dict[str, str], command: str = "run") -> str:
    with pytest.raises(ConfigError) as excinfo:
        settings(flags, environ, command)
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sidecar.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_a_bad_flag_is_named_as_the_flag() -> None:
    assert error({"min_ttl": "soon"}, {}) == (
        "--min-ttl: 'soon' is not a duration (examples: 30s, 5m, 24h, 7d)"
    )


def test_a_bad_variable_is_named_as_the_variable() -> None:
    assert error({}, {"TOMBSTONE_MIN_TTL": "soon"}).startswith("TOMBSTONE_MIN_TTL: 'soon' is not")
    assert error({}, {"TOMBSTONE_NAMESERVER": "1.1.1.1, dns.google"}) == (
        "TOMBSTONE_NAMESERVER: 'dns.google': a nameserver must be an IP address"
    )


def test_a_bad_file_value_is_named_by_file_line_and_key_as_written(tmp_path: Path) -> None:
    config = write(tmp_path, "# sidecar\nmin_ttl: 5m\n\ndns-timeout: soon\n")
    assert error({"config": config}, {}).startswith(
        f"{config} line 4: dns-timeout: 'soon' is not a duration"
    )
    config = write(tmp_path, "deny:\n  - ok.example\n  - bad name.example\n")
    assert error({}, {"TOMBSTONE_CONFIG": config}).startswith(
        f"{config} line 1: deny: 'bad name.example'"
    )


def test_a_flag_overriding_a_bad_file_value_is_what_is_judged(tmp_path: Path) -> None:
    config = write(tmp_path, "min_ttl: soon\n")
    assert settings({"config": config, "min_ttl": "1m"}, {}).min_ttl == 60.0


def test_a_comparison_names_both_places(tmp_path: Path) -> None:
    config = write(tmp_path, "min_ttl: 1h\n")
    assert error({"config": config}, {"TOMBSTONE_MAX_TTL": "5m"}) == (
        f"TOMBSTONE_MAX_TTL: 5m is shorter than min_ttl 1h ({config} line 1)"
    )
    assert error({"max_ttl": "5m"}, {"TOMBSTONE_MIN_TTL": "1h"}) == (
        "--max-ttl: 5m is shorter than TOMBSTONE_MIN_TTL 1h"
    )
    assert error({}, {"TOMBSTONE_SYNAPSE_ADMIN_URL": "http://127.0.0.1:8008"}) == (
        "TOMBSTONE_SYNAPSE_ADMIN_URL: needs --synapse-admin-token-file too"
    )


def test_mitmproxy_values_are_named_as_mitmproxy_options() -> None:
    raw = RawOptions({"min_ttl": "2d"}, fallback=MITMPROXY)
    with pytest.raises(ConfigError) as excinfo:
        Settings.from_raw(raw)
    assert str(excinfo.value) == "tombstone_max_ttl: 24h is shorter than tombstone_min_ttl 2d"


@pytest.mark.parametrize(
    ("variable", "message"),
    [
        (
            "TOMBSTONE_MIN_TLL",
            "TOMBSTONE_MIN_TLL: unknown option (did you mean TOMBSTONE_MIN_TTL?)",
        ),
        (
            "TOMBSTONE_DENYFILE",
            "TOMBSTONE_DENYFILE: unknown option (did you mean TOMBSTONE_DENY_FILE?)",
        ),
        (
            "TOMBSTONE_SYNAPSE_VENV",
            "TOMBSTONE_SYNAPSE_VENV: unknown option; every TOMBSTONE_* "
            "variable must name an option (see --help)",
        ),
    ],
)
def test_a_tombstone_variable_that_names_no_option_is_an_error(variable: str, message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        check_environment({"PATH": "/bin", variable: "10m"})
    assert str(excinfo.value) == message
    assert excinfo.value.option == ""
    for command in ("run", "check", "verdicts", "ca"):
        with pytest.raises(ConfigError, match=f"^{variable}: unknown option"):
            gather_raw({}, {variable: "10m"}, command)


def test_other_variables_and_lowercase_names_are_not_ours() -> None:
    check_environment({"TOMBSTONE": "x", "tombstone_min_tll": "x", "XTOMBSTONE_A": "x"})
    assert gather_raw({}, {"HTTPS_PROXY": "http://127.0.0.1:3128"}) == {}


def test_an_unknown_file_key_names_its_line_and_the_close_option(tmp_path: Path) -> None:
    config = write(tmp_path, "min_ttl: 5m\n\nmax-tll: 1h\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config_file(config)
    assert str(excinfo.value) == (
        f"--config: {config} line 3: unknown option 'max-tll' (did you mean max_ttl?)"
    )
    with pytest.raises(ConfigError, match=f"^TOMBSTONE_CONFIG: {config} line 3: unknown"):
        gather_raw({}, {"TOMBSTONE_CONFIG": config}, "ca")


def test_options_another_subcommand_uses_are_neither_read_nor_validated(tmp_path: Path) -> None:
    """A shared env or file for `run` and `verdicts`: verdicts ignores run's deny file."""
    environ = {
        "TOMBSTONE_DENY_FILE": "/nonexistent/deny.txt",
        "TOMBSTONE_MODE": "bogus",
        "TOMBSTONE_OPS_LISTEN": "127.0.0.1:9999",
    }
    raw = gather_raw({}, environ, "verdicts")
    assert raw == {"ops_listen": "127.0.0.1:9999"}
    verdicts = Settings.from_raw(raw, "verdicts")
    assert str(verdicts.ops_listen) == "127.0.0.1:9999"
    assert verdicts.deny_file == "" and verdicts.mode == "passthrough"
    config = write(tmp_path, "min_ttl: soon\nstate_dir: /var/lib/x\n")
    assert settings({"config": config}, {}, "ca").state_dir == "/var/lib/x"
    assert error({"config": config}, {}, "check").startswith(f"{config} line 1: min_ttl: ")


def test_from_raw_for_a_command_ignores_values_it_does_not_use() -> None:
    """Even given directly: what `ca` does not use keeps its default."""
    ca = Settings.from_raw({"min_ttl": "soon", "state_dir": "/s"}, "ca")
    assert (ca.min_ttl, ca.state_dir) == (300.0, "/s")
    with pytest.raises(ConfigError, match=r"^--min-ttl: "):
        Settings.from_raw({"min_ttl": "soon"}, "check")
