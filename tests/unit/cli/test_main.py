"""The parser tree and dispatch: each subcommand parses and validates only its options."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sidecar.cli import exits
from sidecar.cli.check import EXIT_BY_STATE
from sidecar.cli.main import SUBCOMMANDS, build_parser, main

CLI = Path(__file__).resolve().parents[3] / "sidecar" / "cli"


def test_the_kit_ignores_a_deny_file_only_run_and_check_read(
    capsys: pytest.CaptureFixture[str],
) -> None:
    environ = {"TOMBSTONE_DENY_FILE": "/nonexistent", "TOMBSTONE_MIN_TTL": "soon"}
    assert main(["tombstone", "example.org", "--only", "dns"], environ) == exits.OK
    assert 'example.org. 3600 IN TXT "v=matrix;gone"' in capsys.readouterr().out


def test_check_reports_the_deny_file_by_its_variable(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["check", "example.org"], {"TOMBSTONE_DENY_FILE": "/nonexistent/deny"})
    assert status == exits.USAGE
    assert capsys.readouterr().err == (
        "tombstone-sidecar: error: TOMBSTONE_DENY_FILE: cannot read /nonexistent/deny: "
        "No such file or directory\n"
    )


def test_ca_runs_with_its_own_options_whatever_else_is_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    environ = {"TOMBSTONE_STATE_DIR": str(tmp_path), "TOMBSTONE_LISTEN": "nowhere"}
    assert main(["ca", "--export", str(tmp_path / "ca.pem")], environ) == exits.OK
    assert (tmp_path / "ca.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert f"wrote the certificate to {tmp_path / 'ca.pem'}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["check", "example.org", "--listen", "127.0.0.1:1"],
        ["verdicts", "list", "--deny", "a.example"],
        ["ca", "--min-ttl", "5m"],
        ["tombstone", "example.org", "--config", "x.yaml"],
    ],
)
def test_an_option_of_another_subcommand_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as excinfo:
        build_parser().parse_args(argv)
    assert excinfo.value.code == exits.USAGE
    assert "unrecognized arguments" in capsys.readouterr().err


def test_verdicts_without_an_ops_listener_names_where_it_was_emptied(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["verdicts", "list"], {"TOMBSTONE_OPS_LISTEN": ""}) == exits.USAGE
    assert capsys.readouterr().err == (
        "tombstone-sidecar: error: TOMBSTONE_OPS_LISTEN is empty; nothing to talk to\n"
    )


def test_run_refuses_an_open_listener_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--listen", "0.0.0.0:3128"], {}) == exits.USAGE
    err = capsys.readouterr().err
    assert err.startswith("tombstone-sidecar: error: --listen: 0.0.0.0 is not a loopback")


def test_every_subcommand_module_is_in_the_tree() -> None:
    names = {s.NAME for s in SUBCOMMANDS}
    assert names == {"run", "check", "verdicts", "ca", "tombstone"}
    modules = {p.stem for p in CLI.glob("*.py")} - {"__init__", "__main__", "main", "args", "exits"}
    assert modules == {"run", "check", "verdicts", "ca", "kit"}


def test_check_exit_statuses_come_from_the_one_table() -> None:
    assert set(EXIT_BY_STATE.values()) == {exits.OK, exits.GONE, exits.NO_ANSWER}


def test_no_subcommand_writes_an_exit_status_as_a_number() -> None:
    """Exit statuses are named in exits.py; a bare `return 2` would define one again."""
    for path in CLI.glob("*.py"):
        if path.name == "exits.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant):
                assert not isinstance(node.value.value, int), f"{path.name}:{node.lineno}"
            if isinstance(node, ast.Name):
                assert not node.id.startswith("EXIT_") or node.id == "EXIT_BY_STATE", path.name
