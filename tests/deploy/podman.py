"""A private, rootful podman for the image tests: nothing in /etc, nothing left behind.

Debian's podman 4.3 runs containers on this kind of machine with a private containers.conf
(selected by CONTAINERS_CONF) that picks runc (crun refuses the hybrid cgroup layout) and
lower default ulimits (the defaults are refused). Storage, run state, locks, network config,
events and runc's own state live under one directory that `close()` removes, after removing
every container, volume and image made here (and the few STRAY_PATHS podman makes anyway).

Networking: only `--network=none` (probes run inside with `podman exec`). Podman's default
bridge network (10.88.0.0/16) must never be used on these machines, so `run()` refuses a
`podman run`/`create`/`build` without an explicit `--network=none`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

# What scripts/test installs with apt-get for these tests (Debian package names).
NEEDED = {"podman": "podman", "runc": "runc", "newuidmap": "uidmap", "mmdebstrap": "mmdebstrap"}
ULIMITS = ("nofile=8192:8192", "nproc=4096:4096")
# Made by podman 4.3 or its image library whatever the configuration says (the blob-info
# cache of imports and builds, a per-user config directory).
# Removed again by close() when they did not exist before.
STRAY_PATHS = ("/var/lib/containers", "/var/cache/containers", "~/.config/containers")


def require_podman() -> None:
    """Skip where a rootful podman is impossible (not root); fail where it is only missing."""
    if os.geteuid() != 0:
        pytest.skip("the image tests need root (rootful podman, mmdebstrap); CI runs as root")
    missing = [pkg for cmd, pkg in NEEDED.items() if not shutil.which(cmd, path=_path())]
    if missing:
        pytest.fail(f"not installed: {' '.join(missing)} (apt-get install, or run scripts/test)")


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of `path` that does not exist yet (None: it all exists)."""
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


def _which(command: str) -> str:
    found = shutil.which(command, path=_path())
    assert found is not None, command
    return found


def _path() -> str:
    return os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


class Podman:
    """`podman` with every piece of its state under `root` (see the module doc)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.strays = [_first_missing(Path(os.path.expanduser(p))) for p in STRAY_PATHS]
        for sub in ("storage", "run", "libpod", "cni", "tmp", "bin"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        # runc keeps its state in /run/runc unless given --root, which `podman --runtime-flag`
        # did not pass on every path here (/run/runc still appeared): a wrapper always does.
        runc = root / "bin" / "runc"
        runc.write_text(f'#!/bin/sh\nexec {_which("runc")} --root "{root}/runc" "$@"\n')
        runc.chmod(0o755)
        ulimits = ", ".join(f'"{u}"' for u in ULIMITS)
        (root / "containers.conf").write_text(
            "[containers]\n"
            f"default_ulimits = [{ulimits}]\n"
            "[engine]\n"
            'runtime = "runc"\n'
            f'runtimes = {{ runc = ["{runc}"] }}\n'
            'cgroup_manager = "cgroupfs"\n'  # no systemd as PID 1 here
            'events_logger = "file"\n'
            f'events_logfile_path = "{root}/events.log"\n'
            f'tmp_dir = "{root}/libpod"\n'
            'lock_type = "file"\n'  # under tmp_dir, instead of a shared /dev/shm segment
            f'static_dir = "{root}/storage/libpod"\n'
            f'volume_path = "{root}/storage/volumes"\n'
            f'image_copy_tmp_dir = "{root}/tmp"\n'
            "[network]\n"
            f'network_config_dir = "{root}/cni"\n'
        )
        (root / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{root}/storage"\nrunroot = "{root}/run"\n'
        )
        self.env = {
            **os.environ,
            "PATH": _path(),
            "CONTAINERS_CONF": str(root / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(root / "storage.conf"),
            "TMPDIR": str(root / "tmp"),
        }
        self.command = ["podman"]

    def run(
        self,
        args: Sequence[str],
        timeout: float = 120,
        check: bool = True,
        stdin: int | None = subprocess.DEVNULL,
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(a) for a in args]
        if argv[0] in ("run", "create", "build"):
            assert "--network=none" in argv, "only --network=none here (no default bridge)"
        result = subprocess.run(
            [*self.command, *argv],
            env=self.env,
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"podman {' '.join(argv)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
            )
        return result

    def output(self, args: Sequence[str], timeout: float = 120) -> str:
        return self.run(args, timeout=timeout).stdout.strip()

    def close(self) -> None:
        """Remove every container, volume and image made here, then the whole state tree."""
        for args in (
            ["rm", "--all", "--force", "--volumes", "--time", "5"],
            ["volume", "rm", "--all", "--force"],
            ["rmi", "--all", "--force"],
            ["system", "reset", "--force"],
        ):
            self.run(args, timeout=120, check=False)
        left = [
            line
            for line in Path("/proc/self/mounts").read_text().splitlines()
            if str(self.root) in line
        ]
        for line in left:
            subprocess.run(["umount", "-l", line.split()[1]], check=False, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
        for stray, missing in zip(STRAY_PATHS, self.strays, strict=True):
            if missing is None:
                continue
            path = Path(os.path.expanduser(stray))
            shutil.rmtree(path, ignore_errors=True)
            while path != missing.parent:  # and its parents made with it, if left empty
                with contextlib.suppress(OSError):
                    path.rmdir()
                path = path.parent
