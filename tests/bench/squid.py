"""Squid as the anchor of the CONNECT scenario: what an operator would otherwise put there.

Squid knows nothing of tombstones; given a static `dstdomain` deny list of the same gone
names it refuses their CONNECTs with a 403 and no DNS lookup. The bench runs Debian's
squid (`apt-get install squid`; its system service need not run) as its own process with
a configuration written per run: loopback only, one process, no cache, no access log.
Without squid on the machine the scenario runs without the anchor and says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

INSTALL_HINT = "apt-get install squid (Debian/Ubuntu; the service need not run)"
# Where Debian installs squid; /usr/sbin is not on every user's PATH.
CANDIDATES = ("squid", "/usr/sbin/squid")
# Squid's answer to a denied CONNECT: 403 with its ERR_ACCESS_DENIED page (about 3 KB).
DENIED_STATUS = 403
DENIED_TEXT = "ERR_ACCESS_DENIED"


def squid_binary() -> str | None:
    """The squid executable, or None when it is not installed."""
    for candidate in CANDIDATES:
        found = shutil.which(candidate)
        if found is not None:
            return found
    return None


def squid_version(binary: str) -> str:
    """`Squid Cache: Version 5.7` -> `5.7`; empty when squid does not say."""
    try:
        done = subprocess.run(
            [binary, "-v"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    first = done.stdout.splitlines()[0] if done.stdout else ""
    return first.rpartition("Version ")[2].strip()


def squid_config(port: int, gone: Sequence[str], workdir: Path) -> str:
    """A squid.conf that refuses CONNECTs to `gone` on 127.0.0.1:`port`, and nothing else.

    - `workers 1` and `squid -N` (see `squid_argv`): one process, one core, as the sidecar.
    - `dstdomain` matches the CONNECT's host as written: no DNS lookup for a refusal.
    - `client_persistent_connections off`: squid closes after its 403, as the sidecar
      closes after its refusal; each refusal is one TCP connection, as Synapse makes them
      (the load generator reads until the proxy closes).
    - no cache, no access or store log, no ICMP pinger helper: nothing but refusing.
      The cache log (start-up and errors) goes to stderr, into the bench's process log.
    """
    names = " ".join(gone)
    return "\n".join(
        [
            f"http_port 127.0.0.1:{port}",
            "workers 1",
            f"acl gone dstdomain {names}",
            "http_access deny gone",
            "http_access deny all",
            "client_persistent_connections off",
            "cache deny all",
            "cache_mem 0 MB",
            "access_log none",
            "cache_store_log none",
            "cache_log /dev/stderr",
            "pid_filename none",
            "pinger_enable off",
            f"coredump_dir {workdir}",
            "logfile_rotate 0",
            "shutdown_lifetime 0 seconds",
            "",
        ]
    )


def squid_argv(binary: str, port: int, gone: Sequence[str], workdir: Path) -> list[str]:
    """Write the configuration into `workdir`; the command that runs squid in the
    foreground as a single process (`-N`: no daemon, no worker kids)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        # As root squid switches to its cache_effective_user (Debian: proxy) and must
        # still reach its coredump_dir.
        workdir.chmod(0o755)
    conf = workdir / "squid.conf"
    conf.write_text(squid_config(port, gone, workdir))
    return [binary, "-N", "-f", str(conf)]
