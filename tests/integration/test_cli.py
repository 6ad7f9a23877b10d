"""The command line as operators use it: `check`, errors, `--help`, and the mitmdump script."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.config.options import options_for
from tests.integration.conftest import DEAD_IP, LIVE_IP
from tests.support.dns_server import DnsServer, Zone
from tests.support.procs import ManagedProcess, free_port
from tests.support.sidecar_process import (
    REPO,
    Sidecar,
    mitmdump_command,
    mitmdump_path,
    sidecar_command,
)
from tests.support.tls_upstream import Upstream

# The session's private HOME, XDG directories and TMPDIR (tests/conftest.py): a command run
# with a minimal environment must still never reach the real user's state directory.
PRIVATE = ("HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "TMPDIR")


def minimal_env(**extra: str) -> dict[str, str]:
    """What a user's shell would give (PATH), plus the session's private directories."""
    private = {k: os.environ[k] for k in PRIVATE if k in os.environ}
    return {"PATH": "/usr/bin:/bin", **private, **extra}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*sidecar_command(), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=minimal_env(**(env or {})),
        check=False,
    )


def check(
    dns_server: DnsServer, name: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cli("check", name, "--nameserver", f"127.0.0.1:{dns_server.port}", *args, env=env)


def test_check_alive_name_exits_0_and_shows_every_signal(
    dns_server: DnsServer,
    zone: Zone,
    unique: Callable[[str], str],
) -> None:
    name = unique("check-live")
    zone.add(name, "A", LIVE_IP)
    result = check(dns_server, name)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{name}: ALIVE (no tombstone in DNS)")
    for signal in ("dns_txt_gone", "dns_srv_dot", "invalid_tld", "nxdomain", "addresses"):
        assert f"  {signal}" in result.stdout
    assert LIVE_IP in result.stdout


def test_check_gone_name_exits_1_with_evidence_and_json(
    dns_server: DnsServer,
    zone: Zone,
    unique: Callable[[str], str],
) -> None:
    name = unique("check-gone")
    zone.add(name, "TXT", "v=matrix;gone", ttl=7200)
    zone.add(name, "A", DEAD_IP)
    text = check(dns_server, f"{name}:8448")
    assert text.returncode == 1
    assert text.stdout.startswith(
        f"{name}: GONE (dns_txt_gone: TXT {name} 'v=matrix;gone'), for 7200s"
    )
    assert "dns_txt_gone  GONE" in text.stdout
    report = json.loads(check(dns_server, name, "--json").stdout)
    assert report["verdict"] == {
        "state": "gone",
        "signal": "dns_txt_gone",
        "evidence": f"TXT {name} 'v=matrix;gone'",
        "ttl": 7200,
    }
    findings = {s["signal"]: s["finding"] for s in report["signals"]}
    assert findings == {
        "dns_txt_gone": "gone",
        "dns_srv_dot": "clear",
        "invalid_tld": "clear",
        "nxdomain": "clear",
    }


def test_check_clamps_ttl_and_honours_env_deny(
    dns_server: DnsServer,
    zone: Zone,
    unique: Callable[[str], str],
) -> None:
    name = unique("check-nx")
    zone.nxdomain(name, soa_minimum=30)
    result = check(dns_server, name, "--min-ttl", "10m")
    assert result.returncode == 1
    assert "for 600s" in result.stdout  # SOA minimum 30 s, clamped up to --min-ttl
    denied = unique("check-denied")
    zone.add(denied, "A", LIVE_IP)
    result = check(dns_server, denied, env={"TOMBSTONE_DENY": f"other.example, {denied}"})
    assert result.returncode == 1
    assert "GONE (operator: on the operator deny list)" in result.stdout


def test_check_dns_failure_exits_3_never_gone(
    dns_server: DnsServer,
    zone: Zone,
    unique: Callable[[str], str],
) -> None:
    name = unique("check-fail")
    zone.servfail(name)
    result = check(dns_server, name, "--dns-timeout", "1s")
    assert result.returncode == 3, result.stdout
    assert "NO VERDICT" in result.stdout
    assert "servfail" in result.stdout
    assert "forwarding such names" not in result.stderr  # the proxy's warning, not check's


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["check", "bad..name"], "NAME: 'bad..name' has an empty label"),
        (["run", "--dns-timeout", "soon"], "--dns-timeout: 'soon' is not a duration"),
        (
            ["run", "--nameserver", "dns.example"],
            "--nameserver: 'dns.example': a nameserver must be",
        ),
        (
            ["run", "--allow-address", "10.0.0.0/33"],
            "--allow-address: '10.0.0.0/33' is not an IP network",
        ),
        (["run", "--suppress-status", "200"], "--suppress-status: 200 is outside 400-599"),
        (
            ["run", "--deny-file", "/nonexistent/deny.txt"],
            "--deny-file: cannot read /nonexistent/deny.txt",
        ),
        (["run", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_input_is_one_line_naming_the_option_exit_2(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_env_and_config_values_name_where_they_came_from(tmp_path: Path) -> None:
    result = run_cli("run", env={"TOMBSTONE_MAX_TTL": "forever"})
    assert result.returncode == 2
    assert "error: TOMBSTONE_MAX_TTL: 'forever' is not a duration" in result.stderr
    config = tmp_path / "c.yaml"
    config.write_text("# sidecar\nmin_tll: 5m\n")
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 2
    assert f"--config: {config} line 2: unknown option 'min_tll' (did you mean min_ttl?)" in (
        result.stderr
    )
    config.write_text("deny: [a.example\n")
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 2 and "is not valid YAML" in result.stderr
    config.write_text("# sidecar\nmin_ttl: 5m\nmax-ttl: 1m\n")
    result = run_cli("run", env={"TOMBSTONE_CONFIG": str(config)})
    assert result.returncode == 2
    assert (
        f"error: {config} line 3: max-ttl: 1m is shorter than min_ttl 5m ({config} line 2)\n"
        == result.stderr.split("tombstone-sidecar: ", 1)[1]
    )


def test_unknown_tombstone_variable_is_an_error_naming_the_close_option() -> None:
    result = run_cli("check", "example.org", env={"TOMBSTONE_MIN_TLL": "10m"})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        "tombstone-sidecar: error: TOMBSTONE_MIN_TLL: unknown option "
        "(did you mean TOMBSTONE_MIN_TTL?)\n"
    )
    result = run_cli("verdicts", "list", env={"TOMBSTONE_FROBNICATE": "1"})
    assert result.returncode == 2
    assert "TOMBSTONE_FROBNICATE: unknown option; every TOMBSTONE_* variable" in result.stderr


def test_each_subcommand_reads_only_its_own_options(tmp_path: Path) -> None:
    """A deny file `run` and `check` would read is nothing to `tombstone`, `ca`, `verdicts`."""
    broken = {"TOMBSTONE_DENY_FILE": "/nonexistent", "TOMBSTONE_MODE": "bogus"}
    result = run_cli("tombstone", "example.org", env=broken)
    assert result.returncode == 0, result.stderr
    assert 'example.org. 3600 IN TXT "v=matrix;gone"' in result.stdout
    result = run_cli("ca", "--state-dir", str(tmp_path / "state"), env=broken)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"CA {tmp_path / 'state'}")
    result = run_cli("verdicts", "list", "--ops-listen", f"127.0.0.1:{free_port()}", env=broken)
    assert result.returncode == 3 and "cannot reach the sidecar" in result.stderr
    result = run_cli("check", "example.org", env=broken)
    assert result.returncode == 2
    assert result.stderr.startswith("tombstone-sidecar: error: TOMBSTONE_DENY_FILE: cannot read")
    result = run_cli("check", "example.org", "--mode", "intercept")
    assert result.returncode == 2 and "unrecognized arguments: --mode intercept" in result.stderr


@pytest.mark.parametrize(
    ("command", "present", "absent"),
    [
        (["run"], ["--listen", "--mode", "--deny-file", "--shutdown-grace"], []),
        (
            ["check"],
            ["--nameserver", "--deny-file", "--gone-ttl", "--probe"],
            ["--listen", "--mode", "--store", "--ops-listen", "--shutdown-grace"],
        ),
        (
            ["verdicts", "list"],
            ["--ops-listen", "--ops-token-file", "--synapse-admin-url"],
            ["--deny", "--nameserver", "--mode"],
        ),
        (["ca"], ["--state-dir", "--export"], ["--deny", "--mode", "--ops-listen"]),
        (["tombstone"], ["--max-age", "--only"], ["--config", "--state-dir", "TOMBSTONE_"]),
    ],
)
def test_help_lists_only_the_subcommands_options(
    command: list[str], present: list[str], absent: list[str]
) -> None:
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    for flag in present:
        assert flag in result.stdout, flag
    for flag in absent:
        assert flag not in result.stdout, flag
    words = " ".join(result.stdout.split())  # argparse wraps lines
    for option in options_for(command[0]):  # each says its variable
        assert f"{option.cli} " in words and f"env {option.env})" in words, option.name
    if options_for(command[0]):
        assert "configuration (flag > TOMBSTONE_* variable > --config file > default)" in (
            result.stdout
        )


def test_help_teaches_signals_env_and_examples() -> None:
    result = run_cli("run", "--help")
    assert result.returncode == 0
    for text in (
        "dns_txt_gone",
        "nxdomain",
        "TOMBSTONE_MIN_TTL",
        "HTTPS_PROXY",
        "--no-enforce",
        "fail open",
        "env TOMBSTONE_NAMESERVER",
    ):
        assert text in result.stdout, text


def test_ops_port_in_use_is_a_clear_error(dns_server: DnsServer) -> None:
    busy = Sidecar(dns_server.port)
    busy.start()
    try:
        result = run_cli(
            "run",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--ops-listen",
            f"127.0.0.1:{busy.ops_port}",
        )
    finally:
        busy.stop()
    assert result.returncode == 1
    assert f"cannot listen for ops HTTP on 127.0.0.1:{busy.ops_port}" in result.stderr


def test_mitmdump_script_loads_the_same_addon(
    dns_server: DnsServer,
    zone: Zone,
    dead_upstream: Upstream,
    unique: Callable[[str], str],
    tmp_path: Path,
) -> None:
    name = unique("mitmdump")
    zone.add(name, "TXT", "v=matrix;gone")
    port, ops = free_port(), free_port()
    options = [
        f"tombstone_nameserver=127.0.0.1:{dns_server.port}",
        f"tombstone_ops_listen=127.0.0.1:{ops}",
        "tombstone_deny=old.example",
        "tombstone_refusal=status",
        f"tombstone_state_dir={tmp_path / 'state'}",  # never the user's real state dir
    ]
    process = ManagedProcess(
        mitmdump_command(port, tmp_path, options),
        env={"PYTHONPATH": str(REPO)},
        log_path=tmp_path / "mitmdump.log",
    ).start()
    try:
        process.wait_for_port(port)
        process.wait_for_port(ops)
        proxy = Sidecar.__new__(Sidecar)
        proxy.proxy_port, proxy.ops_port = port, ops
        reply = proxy.connect(f"{name}:{dead_upstream.port}")
        assert reply.status == 502 and reply.headers["x-tombstone-signal"] == "dns_txt_gone"
        assert proxy.connect("old.example:443").headers["x-tombstone-signal"] == "operator"
        assert proxy.metric("tombstone_suppressed_total", signal="operator", stage="connect") == 1
    finally:
        process.stop()
    assert dead_upstream.connections == 0

    def mitmdump_fails(*args: str) -> str:
        result = subprocess.run(
            [
                mitmdump_path(),
                "-q",
                "-p",
                str(free_port()),
                "--set",
                f"confdir={tmp_path}",
                "-s",
                str(REPO / "addons" / "tombstone.py"),
                "--set",
                f"tombstone_state_dir={tmp_path / 'state'}",
                *args,
            ],
            env=minimal_env(PYTHONPATH=str(REPO)),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode != 0, result
        return result.stdout + result.stderr

    output = mitmdump_fails("--listen-host", "127.0.0.1", "--set", "tombstone_min_ttl=abc")
    assert "tombstone_min_ttl: 'abc' is not a duration" in output
    # Without --listen-host mitmdump listens on every interface: refused like `run` refuses a
    # non-loopback --listen without proxy auth (no unauthenticated proxy is ever opened).
    output = mitmdump_fails()
    assert "every interface is not a loopback address" in output, output
    assert "--proxy-auth-file" in output and "--allow-open-proxy" in output


def test_the_start_line_names_the_address_the_proxy_is_bound_to(
    sidecar_factory: Callable[..., Sidecar],
) -> None:
    """Written once the port is bound (not before), with the address mitmproxy listens on."""
    sidecar = sidecar_factory("--no-enforce")
    line = next(line for line in sidecar.log().splitlines() if "proxy listening on" in line)
    assert line.endswith(
        f"proxy listening on http://127.0.0.1:{sidecar.proxy_port} (passthrough), "
        "shadow mode (--no-enforce)"
    ), line
