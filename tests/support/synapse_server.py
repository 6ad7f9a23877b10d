"""A real Synapse (from its own virtualenv) configured for the test world, and its client.

The config is written here in full rather than generated and trimmed, so that every key
that could reach the internet is visibly off: no trusted key servers, no stats reporting,
no URL previews, no push, no TURN, no email. Federation goes through `HTTPS_PROXY` (the
sidecar); `federation_custom_ca_list` makes the world's test CA the only one Synapse
trusts for federation. SQLite, one listener (client + federation) on loopback.

Why its own virtualenv: Synapse pins bcrypt 5, which breaks the passlib that mitmproxy 11
imports at start (docs/design.md §2), so the two never share an environment.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from tests.support.procs import ManagedProcess, ProcessStartError, wait_until

SHARED_SECRET = "e2e-registration-secret"  # the world is private; the secret need not be
VENV_ENV = "SIDECAR_TEST_SYNAPSE_VENV"
_LOOSE = {"per_second": 10000, "burst_count": 10000}


def find_venv(root: Path) -> Path:
    """The Synapse virtualenv: $SIDECAR_TEST_SYNAPSE_VENV, else `.venv-synapse` in the repo."""
    venv = Path(os.environ.get(VENV_ENV) or root / ".venv-synapse")
    python = venv / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(
            f"no Synapse virtualenv at {venv} (set {VENV_ENV}, or run scripts/test, which "
            "builds .venv-synapse with `pip install matrix-synapse`)"
        )
    return venv


def homeserver_config(
    directory: Path, server_name: str, port: int, ca_file: Path, extra: dict[str, Any] | None
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "server_name": server_name,
        "pid_file": str(directory / "homeserver.pid"),
        "public_baseurl": f"http://127.0.0.1:{port}/",
        "listeners": [
            {
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client", "federation"], "compress": False}],
            }
        ],
        "database": {"name": "sqlite3", "args": {"database": str(directory / "homeserver.db")}},
        "log_config": str(directory / "log.config"),
        "media_store_path": str(directory / "media"),
        "signing_key_path": str(directory / "signing.key"),
        "registration_shared_secret": SHARED_SECRET,
        "report_stats": False,
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "federation_custom_ca_list": [str(ca_file)],
        "url_preview_enabled": False,
        "enable_metrics": False,
        "enable_registration": False,
        "push": {"enabled": False},
        "presence": {"enabled": False},
        "user_directory": {"enabled": False},
        "include_profile_data_on_invite": False,
        "limit_profile_requests_to_users_who_share_rooms": False,
        "allow_public_rooms_over_federation": False,
        "rc_message": _LOOSE,
        "rc_registration": _LOOSE,
        "rc_login": {"address": _LOOSE, "account": _LOOSE, "failed_attempts": _LOOSE},
        "rc_joins": {"local": _LOOSE, "remote": _LOOSE},
        "rc_joins_per_room": _LOOSE,
        "rc_invites": {"per_room": _LOOSE, "per_user": _LOOSE, "per_issuer": _LOOSE},
        "rc_room_creation": _LOOSE,
        "rc_profile": _LOOSE,
        "rc_federation": {"window_size": 1000, "sleep_limit": 1000, "reject_limit": 1000},
    }
    config.update(extra or {})
    return config


LOG_CONFIG = """\
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
handlers:
  file:
    class: logging.FileHandler
    filename: {path}
    formatter: precise
    filters: [context]
filters:
  context:
    (): synapse.logging.context.LoggingContextFilter
loggers:
  synapse.storage.SQL:
    level: WARNING
  twisted:
    level: INFO
root:
  level: INFO
  handlers: [file]
disable_existing_loggers: false
"""


@dataclass
class Account:
    user_id: str
    access_token: str
    password: str


class Synapse:
    """One Synapse process in the world, driven over its client-server API."""

    def __init__(
        self,
        venv: Path,
        directory: Path,
        *,
        server_name: str,
        port: int,
        proxy_url: str,
        ca_file: Path,
        command_prefix: Sequence[str] = (),
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        self.venv = venv
        self.directory = directory
        self.server_name = server_name
        self.port = port
        self.proxy_url = proxy_url
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "media").mkdir(exist_ok=True)
        self.config_path = directory / "homeserver.yaml"
        self.log_path = directory / "homeserver.log"
        self.db_path = directory / "homeserver.db"
        config = homeserver_config(directory, server_name, port, ca_file, extra_config)
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        (directory / "log.config").write_text(LOG_CONFIG.replace("{path}", str(self.log_path)))
        env = {
            "HTTPS_PROXY": proxy_url,
            "https_proxy": proxy_url,
            "NO_PROXY": "",
            "no_proxy": "",
            "HTTP_PROXY": "",
            "http_proxy": "",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        python = str(venv / "bin" / "python")
        self.process = ManagedProcess(
            [
                *command_prefix,
                python,
                "-m",
                "synapse.app.homeserver",
                "--config-path",
                str(self.config_path),
            ],
            env=env,
            cwd=directory,
            log_path=directory / "stdout.log",
        )
        self._write_signing_key()
        self.started_in = 0.0

    def _write_signing_key(self) -> None:
        """What `--generate-keys` writes (`ed25519 <version> <seed>`), without a 4 s start."""
        seed = Ed25519PrivateKey.generate().private_bytes(
            Encoding.Raw, PrivateFormat.Raw, NoEncryption()
        )
        encoded = base64.b64encode(seed).decode().rstrip("=")
        (self.directory / "signing.key").write_text(f"ed25519 a_e2e {encoded}\n")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> Synapse:
        started = time.monotonic()
        self.process.start()
        deadline = started + timeout
        with httpx.Client(trust_env=False, timeout=2) as client:
            while True:
                if not self.process.alive:
                    raise ProcessStartError(
                        f"Synapse exited with {self.process.returncode}; stdout:\n"
                        f"{self.process.log_tail()}\nlog:\n{self.log_tail()}"
                    )
                try:
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise ProcessStartError(
                        f"Synapse not healthy after {timeout}s; log:\n{self.log_tail()}"
                    )
                time.sleep(0.05)
        self.started_in = time.monotonic() - started
        return self

    def stop(self) -> None:
        self.process.stop(grace=10)

    # -- logs and database ------------------------------------------------------------

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_mark(self) -> int:
        """A position in the log; `log_since(mark)` is what was written after it."""
        return len(self.log_text())

    def log_since(self, mark: int) -> str:
        return self.log_text()[mark:]

    def destinations(self) -> dict[str, dict[str, Any]]:
        """Synapse's per-destination backoff table (`destinations`), by destination."""
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM destinations").fetchall()
        return {row["destination"]: dict(row) for row in rows}

    def wait_for_destination(self, name: str, timeout: float = 10.0) -> dict[str, Any] | None:
        """The row for `name` once Synapse has written a backoff for it (retry_interval > 0)."""
        found: dict[str, Any] = {}

        def written() -> bool:
            row = self.destinations().get(name)
            if row and (row.get("retry_interval") or 0) > 0:
                found.update(row)
                return True
            return False

        return found if wait_until(written, timeout=timeout, interval=0.1) else None

    # -- accounts ---------------------------------------------------------------------

    def register(
        self, localpart: str, password: str = "e2e-password", admin: bool = False
    ) -> Account:
        """Register through the shared-secret admin API (what register_new_matrix_user does)."""
        with httpx.Client(base_url=self.base_url, trust_env=False, timeout=30) as client:
            nonce = client.get("/_synapse/admin/v1/register").json()["nonce"]
            message = "\x00".join((nonce, localpart, password, "admin" if admin else "notadmin"))
            mac = hmac.new(SHARED_SECRET.encode(), message.encode(), hashlib.sha1)
            body = {
                "nonce": nonce,
                "username": localpart,
                "password": password,
                "admin": admin,
                "mac": mac.hexdigest(),
            }
            reply = client.post("/_synapse/admin/v1/register", json=body)
            reply.raise_for_status()
            data = reply.json()
        return Account(data["user_id"], data["access_token"], password)

    def client(self, account: Account, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            trust_env=False,
            timeout=timeout,
            headers={"Authorization": f"Bearer {account.access_token}"},
        )


def count_critical(log: str) -> dict[str, int]:
    """CRITICAL lines, Tracebacks, and the ProxyConnectError ones among them, in a log text."""
    return {
        "critical": len(re.findall(r" - CRITICAL - ", log)),
        "traceback": log.count("Traceback (most recent call last)"),
        "proxy_connect_error": log.count("ProxyConnectError"),
        "error": len(re.findall(r" - ERROR - ", log)),
        "warning": len(re.findall(r" - WARNING - ", log)),
    }
