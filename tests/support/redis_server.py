"""A real redis-server on loopback for the shared-store tests, killable and restartable."""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

from tests.support.procs import ManagedProcess, free_port, wait_for_port


class RedisServer:
    """`redis-server` on 127.0.0.1 with no persistence; `stop()`/`start()` keep the port."""

    def __init__(self, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (scripts/test installs it with apt)")
        self.binary = binary
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="redis-"))
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.dir.mkdir(exist_ok=True)
        argv = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
        ]
        self.process = ManagedProcess(argv, log_path=self.dir / "redis.log").start()
        assert self.process.proc is not None
        wait_for_port(self.port, proc=self.process.proc, log_path=self.process.log_path)
        return self

    def stop(self) -> None:
        """Stop the server and remove its directory (`start()` makes it again)."""
        if self.process is not None:
            self.process.stop(grace=2)
            self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def command(self, *args: str) -> bytes:
        """Send one command in RESP and return the raw reply (enough for GET/KEYS/PING)."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(payload.encode())
            return sock.recv(1 << 20)
