"""A private network + mount namespace for the test world, and ways into it.

The world must never touch the host: its DNS server binds 127.0.0.1:53, its remotes bind
443 and 8448, and Synapse reads `/etc/resolv.conf`. So it lives in namespaces of its own:

- `hold()` (run as `python -m tests.support.netns DIR` under `unshare --net --mount`) is the
  *holder*: it makes every mount private (so nothing propagates back to the host), binds
  `DIR/resolv.conf` and `DIR/hosts` over `/etc/resolv.conf` and `/etc/hosts` inside the
  namespace only, brings `lo` up, prints `ready` and sleeps until its stdin closes.
  Its `/proc/PID/ns/{net,mnt}` are the world.
- `Namespace` starts a holder and offers the two ways in:
  * `enter_net()`: move the *calling thread* into the world's network namespace
    (`setns(2)`, per thread). Sockets and threads created afterwards belong to the world;
    `leave_net()` moves the thread back. The test process uses this, so fixtures and tests
    reach 127.0.0.1:8008 of the world with ordinary clients and read the in-process DNS
    server's and remotes' counters directly.
  * `command(argv)`: `nsenter --net --mount` prefix for child processes (the sidecar,
    Synapse), which also need the world's `/etc/resolv.conf`.

Everything is plain syscalls through ctypes and util-linux's `unshare`/`nsenter`, and
needs root (CAP_SYS_ADMIN). `check_prerequisites()` names whatever is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class NamespaceError(RuntimeError):
    """The world's namespaces cannot be made here; the message says why and what to do."""


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str, target: str, flags: int) -> None:
    _check(
        _libc.mount(source.encode(), target.encode(), None, ctypes.c_ulong(flags), None),
        f"mount {source} on {target}",
    )


def bring_up_loopback() -> None:
    """`ip link set lo up` without needing iproute2."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def isolate_files(etc_dir: Path) -> None:
    """Inside a fresh mount namespace: our resolv.conf and hosts, invisible to the host."""
    _mount("none", "/", MS_REC | MS_PRIVATE)  # never propagate a mount back to the host
    for name in ("resolv.conf", "hosts"):
        _mount(str(etc_dir / name), f"/etc/{name}", MS_BIND)


def hold(etc_dir: Path) -> int:
    """Holder process body (already unshared): set up, say ready, wait for stdin EOF.

    EOF means the test process stopped the world or died. Either way nothing of the world
    may outlive it: every other process still in this network namespace is ended.
    """
    isolate_files(etc_dir)
    bring_up_loopback()
    print("ready", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        sys.stdin.buffer.read()
    reap_namespace()
    return 0


def _members() -> list[int]:
    """PIDs of the other processes in this network namespace (not us, not our parent)."""
    own = os.readlink("/proc/self/ns/net")
    skip = {os.getpid(), os.getppid()}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{entry}/ns/net") == own:
                found.append(int(entry))
    return found


def reap_namespace(grace: float = 5.0) -> list[int]:
    """SIGTERM every process left in the world, SIGKILL what survives `grace` seconds."""
    left = _members()
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _members() and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in _members():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def check_prerequisites() -> None:
    """Raise NamespaceError naming the first thing that stops the world from starting."""
    if not sys.platform.startswith("linux"):
        raise NamespaceError(f"the test world needs Linux namespaces; this is {sys.platform}")
    if os.geteuid() != 0:
        raise NamespaceError(
            "the test world needs root: it creates network and mount namespaces "
            "(unshare -n -m) and binds ports 53/443/8448 inside them. Run the suite as root "
            "(CI does), e.g. `sudo scripts/test`."
        )
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            raise NamespaceError(
                f"the test world needs `{tool}` (util-linux): apt-get install util-linux"
            )


class Namespace:
    """A running holder process: the world's network and mount namespaces."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None
        self._home_net: int | None = None  # fd of the thread's namespace before enter_net

    def start(self, hosts: str, nameserver: str = "127.0.0.1") -> Namespace:
        check_prerequisites()
        etc = self.directory / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {nameserver}\noptions timeout:2 attempts:2\n")
        (etc / "hosts").write_text(hosts)
        root = Path(__file__).resolve().parents[2]
        argv = [
            "unshare",
            "--net",
            "--mount",
            sys.executable,
            "-m",
            "tests.support.netns",
            str(etc),
        ]
        self.proc = subprocess.Popen(
            argv,
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.proc.kill()
            _, err = self.proc.communicate(timeout=5)
            raise NamespaceError(
                f"`{' '.join(argv)}` could not create the world's namespaces "
                f"(exit {self.proc.returncode}): {err.decode(errors='replace').strip()}"
            )
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("namespace not started")
        return self.proc.pid

    def command(self, argv: Sequence[str]) -> list[str]:
        """argv run inside the world (network and mount namespace, world's /etc files)."""
        return ["nsenter", f"--target={self.pid}", "--net", "--mount", "--", *argv]

    def enter_net(self) -> None:
        """Move the calling thread into the world's network namespace."""
        if self._home_net is not None:
            return
        self._home_net = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/proc/{self.pid}/ns/net", os.O_RDONLY)
        try:
            _check(_libc.setns(target, CLONE_NEWNET), "setns into the world's network")
        except OSError:
            os.close(self._home_net)
            self._home_net = None
            raise
        finally:
            os.close(target)

    def leave_net(self) -> None:
        """Move the calling thread back to the network namespace it came from."""
        if self._home_net is None:
            return
        try:
            _check(_libc.setns(self._home_net, CLONE_NEWNET), "setns back to the host network")
        finally:
            os.close(self._home_net)
            self._home_net = None

    def stop(self) -> None:
        self.leave_net()
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        deadline = time.monotonic() + 5
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: unshare --net --mount python -m tests.support.netns ETC_DIR", file=sys.stderr)
        return 2
    return hold(Path(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
