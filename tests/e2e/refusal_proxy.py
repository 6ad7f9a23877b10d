"""A tiny CONNECT proxy that refuses chosen names in one of several ways (an experiment).

With `--refusal status` the sidecar refuses a CONNECT to a gone server with a 502.
Synapse raises on any non-200 CONNECT status inside Twisted's `dataReceived`, which Twisted
logs as a CRITICAL "Unhandled Error" with a traceback. This proxy lets a test measure what
other refusals do to Synapse (client answer, backoff, log) without touching the sidecar:

    502        answer 502 + JSON + `Connection: close`, then close (--refusal status)
    200-close  answer `200 Connection established`, then close before any TLS (FIN)
    200-reset  answer 200, then reset the connection (RST)
    close      close without answering (FIN)
    reset      reset without answering (RST)

Names not refused are tunnelled to the address the `addresses` map gives them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections import Counter
from collections.abc import Mapping

METHODS = ("502", "200-close", "200-reset", "close", "reset")
BODY = b'{"errcode":"M_SERVER_DECOMMISSIONED","error":"gone (experiment)","signal":"experiment"}'


class RefusalProxy:
    """Runs on its own event loop thread; start() from the thread that owns the network."""

    def __init__(self, method: str, gone: set[str], addresses: Mapping[str, str]) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown refusal method {method!r}")
        self.method = method
        self.gone = {g.lower() for g in gone}
        self.addresses = dict(addresses)
        self.port = 0
        self.refused: Counter[str] = Counter()
        self.tunnelled: Counter[str] = Counter()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RefusalProxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self.port = future.result(timeout=10)
        return self

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def stop(self) -> None:
        """Close the listener and every tunnel, cancel every task, close the loop."""

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._loop.is_running():
            self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._serve(reader, writer)
        finally:
            self._writers.discard(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            writer.close()
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        target = request_line[1] if len(request_line) == 3 else ""
        host, _, port = target.rpartition(":")
        host = host.strip("[]").lower()
        if request_line[:1] != ["CONNECT"] or host in self.gone or not host:
            self.refused[host] += 1
            await self._refuse(writer)
            return
        address = self.addresses.get(host)
        if address is None:
            self.refused[host] += 1
            await self._refuse(writer)
            return
        await self._tunnel(reader, writer, host, address, int(port or 443))

    async def _refuse(self, writer: asyncio.StreamWriter) -> None:
        method = self.method
        if method == "502":
            writer.write(
                b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
            )
        elif method.startswith("200"):
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        with contextlib.suppress(OSError):
            await writer.drain()
        if method.endswith("reset"):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    async def _tunnel(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        host: str,
        address: str,
        port: int,
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(address, port), 10
            )
        except (OSError, TimeoutError):
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n\r\n")
            writer.close()
            return
        self.tunnelled[host] += 1
        self._writers.add(up_writer)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                with contextlib.suppress(OSError):
                    dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._writers.discard(up_writer)
