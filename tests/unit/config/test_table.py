"""The option table: every option declared once, completely, and spelled one way each."""

from __future__ import annotations

from collections import Counter

import pytest

from sidecar.config.options import (
    ADDON_OPTIONS,
    ALL_COMMANDS,
    BY_NAME,
    OPTIONS,
    Option,
    Settings,
    options_for,
)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_every_option_is_declared_completely(option: Option) -> None:
    assert option.help.strip() and option.help.rstrip().endswith((".", ")")), option.help
    assert option.env == "TOMBSTONE_" + option.name.upper()
    assert option.yaml == option.name and option.cli == "--" + option.name.replace("_", "-")
    assert option.mitm == "tombstone_" + option.name
    assert option.uses and option.uses <= ALL_COMMANDS
    assert option.flag or option.metavar, "a value option shows what its value looks like"
    assert not (option.flag and option.repeatable)


@pytest.mark.parametrize("spelling", ["name", "cli", "env", "yaml", "mitm"])
def test_no_two_options_share_a_spelling(spelling: str) -> None:
    counts = Counter(getattr(o, spelling) for o in OPTIONS)
    assert [name for name, n in counts.items() if n > 1] == []


def test_every_option_reads_its_own_default() -> None:
    """Defaults go through the same parsers as given values; none may be invalid."""
    settings = Settings.from_raw({})
    assert settings.listen.port == 3128 and settings.min_ttl == 300.0


def test_every_option_is_a_run_option_and_run_reads_them_all() -> None:
    """`run` is the sidecar: whatever another subcommand reads, the sidecar reads too, so a
    shared config file or environment means the same to both."""
    assert options_for("run") == OPTIONS


@pytest.mark.parametrize(
    ("command", "names"),
    [
        ("ca", {"config", "state_dir"}),
        (
            "verdicts",
            {
                "config",
                "ops_listen",
                "ops_token_file",
                "synapse_admin_url",
                "synapse_admin_token_file",
            },
        ),
        ("tombstone", set()),
    ],
)
def test_small_subcommands_read_only_their_options(command: str, names: set[str]) -> None:
    assert {o.name for o in options_for(command)} == names


def test_check_reads_what_judging_one_name_needs_and_nothing_of_the_proxy() -> None:
    check = {o.name for o in options_for("check")}
    assert {
        "nameserver",
        "dns_timeout",
        "min_ttl",
        "max_ttl",
        "deny",
        "deny_file",
        "allow",
        "allow_file",
        "require_dnssec",
        "gone_ttl",
        "upstream_ca",
    } <= check
    assert check.isdisjoint({"listen", "mode", "store", "ops_listen", "enforce", "probe"})


@pytest.mark.parametrize(
    "pair",
    [
        ("min_ttl", "max_ttl"),
        ("min_gone_ttl", "max_gone_ttl"),
        ("breaker_min", "breaker_max"),
        ("synapse_admin_url", "synapse_admin_token_file"),
    ],
)
def test_options_checked_together_are_read_together(pair: tuple[str, str]) -> None:
    """from_raw compares these two; a subcommand reading only one would compare a given
    value with a default the operator never chose."""
    first, second = (BY_NAME[name] for name in pair)
    assert first.uses == second.uses


def test_mitmdump_gets_every_option_but_those_of_the_run_command_itself() -> None:
    outside = {o.name for o in OPTIONS} - {o.name for o in ADDON_OPTIONS}
    # mitmdump has its own listen address, log level and lifecycle; config is CLI-only.
    assert outside == {"config", "listen", "reuse_port", "shutdown_grace", "log_level"}
