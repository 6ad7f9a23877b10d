"""Real nginx and Caddy (Debian packages) on loopback, serving a config fragment verbatim.

The decommissioning kit prints snippets for operators to paste into their web server; the
only proof that they work is the web server itself. Each instance lives in a temporary
prefix (config, pid, logs, temp dirs), listens on the given loopback address and ports
with TLS from the test CA, and wraps the fragment in the smallest server/site block.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from tests.support.procs import ManagedProcess, wait_for_port
from tests.support.tls_upstream import TestCA

FALLBACK_BODY = "not a tombstone path"  # what the block answers outside the snippet's paths


def require(tool: str, package: str) -> str:
    """The tool's path, or a failure that says how to install it (never a silent skip)."""
    path = shutil.which(tool) or next(
        (p for p in (f"/usr/sbin/{tool}", f"/usr/bin/{tool}") if Path(p).exists()), None
    )
    if path is None:
        raise RuntimeError(
            f"{tool} is not installed: run scripts/test (it installs it) or "
            f"`apt-get install {package}`"
        )
    return path


class _WebServer:
    def __init__(self, root: Path, ca: TestCA, name: str, host: str, ports: Sequence[int]) -> None:
        self.root = root
        self.host = host
        self.ports = tuple(ports)
        self.root.mkdir(parents=True, exist_ok=True)
        self.cert, self.key = ca.write_leaf([name, f"*.{name}"], stem=f"leaf-{root.name}")
        self.process: ManagedProcess | None = None

    def _start(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.process = ManagedProcess(argv, env=env, log_path=self.root / "process.log")
        self.process.start()
        assert self.process.proc is not None
        for port in self.ports:
            wait_for_port(port, self.host, proc=self.process.proc, log_path=self.process.log_path)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def log(self) -> str:
        return self.process.log_text() if self.process is not None else ""


class Nginx(_WebServer):
    """`nginx -p PREFIX -c nginx.conf`, one server block holding the snippet."""

    def start(self, snippet: str) -> Nginx:
        nginx = require("nginx", "nginx")
        listen = "\n".join(f"    listen {self.host}:{port} ssl;" for port in self.ports)
        kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        temp = "\n".join(f"  {kind}_temp_path {self.root}/{kind};" for kind in kinds)
        self.access_log = self.root / "access.log"
        self.access_log.touch()
        (self.root / "nginx.conf").write_text(f"""\
daemon off;
master_process on;
worker_processes 1;
pid {self.root}/nginx.pid;
error_log {self.root}/error.log info;
events {{ worker_connections 64; }}
http {{
  access_log {self.access_log};
{temp}
  server {{
{listen}
    server_name _;
    ssl_certificate {self.cert};
    ssl_certificate_key {self.key};
    location / {{ return 200 '{FALLBACK_BODY}'; }}
# --- the generated snippet, verbatim ---
{snippet}
# --- end of snippet ---
  }}
}}
""")
        self._start(
            [
                nginx,
                "-p",
                str(self.root),
                "-e",
                str(self.root / "error.log"),
                "-c",
                str(self.root / "nginx.conf"),
            ]
        )
        return self

    def requests(self) -> list[str]:
        """Access log lines: every request that reached nginx."""
        return [line for line in self.access_log.read_text().splitlines() if line]

    def log(self) -> str:
        error = self.root / "error.log"
        return super().log() + (error.read_text(errors="replace") if error.exists() else "")


class Caddy(_WebServer):
    """`caddy run` on a Caddyfile with one site block holding the snippet; no admin API,
    no automatic HTTPS, storage in the prefix."""

    def start(self, snippet: str, name: str) -> Caddy:
        caddy = require("caddy", "caddy")
        sites = ", ".join(f"https://{name}:{port}" for port in self.ports)
        caddyfile = self.root / "Caddyfile"
        caddyfile.write_text(f"""\
{{
\tadmin off
\tauto_https off
\tstorage file_system {self.root}/data
}}
{sites} {{
\tbind {self.host}
\ttls {self.cert} {self.key}
# --- the generated snippet, verbatim ---
{snippet}
# --- end of snippet ---
\trespond "{FALLBACK_BODY}" 200
}}
""")
        env = {
            "HOME": str(self.root),
            "XDG_DATA_HOME": str(self.root / "data"),
            "XDG_CONFIG_HOME": str(self.root / "config"),
        }
        self._start([caddy, "run", "--config", str(caddyfile), "--adapter", "caddyfile"], env)
        return self
