"""The admin API's inputs: the URL an operator gives, the rows Synapse returns."""

from __future__ import annotations

import pytest

from sidecar.config.options import ConfigError, Settings
from sidecar.synapse.admin import AdminEndpoint, Destination


@pytest.mark.parametrize(
    ("url", "where"),
    [
        ("http://127.0.0.1:8008", ("http", "127.0.0.1", 8008, "", "http://127.0.0.1:8008")),
        (
            "https://matrix.example.org/",
            ("https", "matrix.example.org", 443, "", "https://matrix.example.org"),
        ),
        (
            "http://[::1]:8008/synapse",
            ("http", "::1", 8008, "/synapse", "http://[::1]:8008/synapse"),
        ),
    ],
)
def test_admin_urls_are_taken_apart(url: str, where: tuple[object, ...]) -> None:
    endpoint = AdminEndpoint.parse(url)
    assert (
        endpoint.scheme,
        endpoint.host,
        endpoint.port,
        endpoint.base_path,
        str(endpoint),
    ) == where


@pytest.mark.parametrize(
    "url",
    ["127.0.0.1:8008", "ftp://x", "http://", "http://h:99999", "http://u:p@h/", "http://h/?q"],
)
def test_bad_admin_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        AdminEndpoint.parse(url)


def test_a_destination_row_reads_as_backing_off_or_not() -> None:
    failing = Destination.from_json(
        {
            "destination": "a.org",
            "retry_last_ts": 5,
            "retry_interval": 600000,
            "failure_ts": 4,
            "last_successful_stream_ordering": None,
        }
    )
    fine = Destination.from_json(
        {
            "destination": "b.org",
            "retry_last_ts": 0,
            "retry_interval": 0,
            "failure_ts": None,
            "last_successful_stream_ordering": 12,
        }
    )
    assert failing.backing_off and not fine.backing_off
    assert fine.last_successful_stream_ordering == 12
    with pytest.raises(ValueError):
        Destination.from_json({"destination": "c.org", "retry_interval": "soon"})


def test_admin_options_come_in_pairs_and_read_the_token_file(tmp_path: object) -> None:
    from pathlib import Path

    token = Path(str(tmp_path)) / "admin-token"
    token.write_text("syt_YWxpY2U_abcdefghijklmnop_0123\n")
    with pytest.raises(ConfigError, match="--synapse-admin-url: needs --synapse-admin-token"):
        Settings.from_raw({"synapse_admin_url": "http://127.0.0.1:8008"})
    with pytest.raises(ConfigError, match="--synapse-admin-token-file: needs --synapse-admin-url"):
        Settings.from_raw({"synapse_admin_token_file": str(token)})
    with pytest.raises(ConfigError, match="--synapse-admin-url: 'synapse:8008' must start with"):
        Settings.from_raw(
            {"synapse_admin_url": "synapse:8008", "synapse_admin_token_file": str(token)}
        )
    with pytest.raises(ConfigError, match="--synapse-admin-token-file: cannot read"):
        Settings.from_raw(
            {
                "synapse_admin_url": "http://h:8008",
                "synapse_admin_token_file": str(token) + ".missing",
            }
        )
    settings = Settings.from_raw(
        {
            "synapse_admin_url": "http://h:8008/",
            "synapse_admin_token_file": str(token),
            "synapse_admin_poll": "5s",
            "hold_reborn": True,
        }
    )
    assert settings.synapse_admin_url == "http://h:8008"
    assert settings.synapse_admin_token == "syt_YWxpY2U_abcdefghijklmnop_0123"
    assert settings.synapse_admin_poll == 5.0 and settings.hold_reborn
