"""Load generator, run as its own process: `python -m tests.bench.load MODE ...`; JSON on stdout.

Kept apart from the proxy under test (the harness pins the two to different cores) and
written on asyncio raw sockets, so that one generator process drives a mitmproxy process
to saturation. Each result carries the generator's own CPU use, so a run can prove the
generator was not the bottleneck.

Modes:
- `connect`: open TCP to the proxy, send a CONNECT, read the whole answer until the proxy
  closes, count; `--concurrency` workers loop until `--seconds` are up.
- `tls`: a new tunnel (CONNECT, or a direct TCP connection with `--direct`), a TLS
  handshake that trusts only `--cafile`, one small GET with `Connection: close`.
- `pooled`: one tunnel per worker, then sequential keep-alive GETs on it until time is up.
  With `--cafile` naming an intercepting proxy's CA and `--header` an X-Matrix
  Authorization, this is the intercept-mode load: TLS ends at the proxy, which opens
  its own TLS to the upstream.
- `names`: one CONNECT per listed name, `--concurrency` at a time, each timed.
- `serve502`: a trivial asyncio server answering 502 and closing; the ceiling check for
  the generator itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

LINGER_SECONDS = 10.0  # requests started before the deadline get this long to finish


@dataclass
class Tally:
    """Completed requests, failures and per-request latencies of one run."""

    count: int = 0
    errors: int = 0
    first_error: str = ""
    latencies_ns: list[int] = field(default_factory=list)

    def fail(self, error: BaseException | str) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = (
                error if isinstance(error, str) else f"{type(error).__name__}: {error}"
            )


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _split(authority: str) -> tuple[str, int]:
    host, _, port = authority.rpartition(":")
    return host, int(port)


def _percentile(values: list[int], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index] / 1e6


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, int]:
    """Read a response head; return (status, content-length or -1)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, _, rest = head.partition(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        raise ValueError(f"bad status line {status_line[:80]!r}")
    length = -1
    for line in rest.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"content-length":
            length = int(value.strip())
    return int(parts[1]), length


async def _open_tunnel(
    args: argparse.Namespace, ctx: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS stream to the upstream: via a CONNECT tunnel, or directly with `--direct`."""
    if args.direct:
        host, port = _split(args.direct)
        return await asyncio.open_connection(host, port, ssl=ctx, server_hostname=args.name)
    host, port = _split(args.proxy)
    reader, writer = await asyncio.open_connection(host, port)
    target = f"{args.connect_host or args.name}:{args.port}"
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    status, _ = await _read_head(reader)
    if status != 200:
        writer.close()
        raise ValueError(f"CONNECT {target} answered {status}")
    await writer.start_tls(ctx, server_hostname=args.name)
    return reader, writer


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
    writer.write(request)
    status, length = await _read_head(reader)
    if status != 200:
        raise ValueError(f"GET answered {status}")
    if length > 0:
        await reader.readexactly(length)


async def _loop_until(deadline: float, tally: Tally, once: Callable[[], Awaitable[None]]) -> None:
    while time.monotonic() < deadline:
        started = time.perf_counter_ns()
        try:
            await once()
        except (OSError, ValueError, asyncio.IncompleteReadError, ssl.SSLError) as e:
            tally.fail(e)
            await asyncio.sleep(0.001)  # a refusing target must not turn this into a spin
            continue
        tally.latencies_ns.append(time.perf_counter_ns() - started)
        tally.count += 1


async def _run_workers(
    args: argparse.Namespace, worker: Callable[[float, Tally], Coroutine[Any, Any, None]]
) -> dict[str, Any]:
    tally = Tally()
    cpu0, wall0 = _cpu_seconds(), time.monotonic()
    deadline = wall0 + args.seconds
    tasks = [asyncio.create_task(worker(deadline, tally)) for _ in range(args.concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=args.seconds + LINGER_SECONDS)
    for task in pending:
        task.cancel()
        tally.fail("request still running long after the deadline")
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            tally.fail(task.exception() or "worker failed")
    elapsed = time.monotonic() - wall0
    cpu = _cpu_seconds() - cpu0
    return {
        "count": tally.count,
        "errors": tally.errors,
        "first_error": tally.first_error,
        "elapsed": elapsed,
        "rate": tally.count / elapsed if elapsed > 0 else 0.0,
        "cpu_seconds": cpu,
        "cpu_share": cpu / elapsed if elapsed > 0 else 0.0,
        "latency_p50_ms": _percentile(tally.latencies_ns, 0.50),
        "latency_p99_ms": _percentile(tally.latencies_ns, 0.99),
    }


# -- modes -------------------------------------------------------------------------------


async def mode_connect(args: argparse.Namespace) -> dict[str, Any]:
    host, port = _split(args.proxy)
    payload = f"CONNECT {args.target} HTTP/1.1\r\nHost: {args.target}\r\n\r\n".encode()
    expect = f"HTTP/1.1 {args.expect} ".encode()
    expect_text = args.expect_text.encode()

    async def once() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(payload)
            answer = await reader.read()  # until the proxy closes
        finally:
            writer.close()
        if args.expect == 0:  # refused by closing: not a byte back
            if answer:
                raise ValueError(f"expected the connection closed, got {answer[:80]!r}")
        elif not answer.startswith(expect) or expect_text not in answer:
            raise ValueError(f"unexpected answer {answer[:80]!r}")

    async def worker(deadline: float, tally: Tally) -> None:
        await _loop_until(deadline, tally, once)

    return await _run_workers(args, worker)


def _client_context(cafile: str) -> ssl.SSLContext:
    """Trusts only the test CA: an intercepting proxy in the path fails the handshake."""
    # With `cafile`, create_default_context loads only that file, not the system store.
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)


def _request(args: argparse.Namespace, *extra: str) -> bytes:
    """The GET request: Host, any `--header` lines, then `extra` header lines."""
    lines = [f"GET {args.path} HTTP/1.1", f"Host: {args.name}", *args.header, *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def mode_tls(args: argparse.Namespace) -> dict[str, Any]:
    ctx = _client_context(args.cafile)
    request = _request(args, "Connection: close")

    async def once() -> None:
        reader, writer = await _open_tunnel(args, ctx)
        try:
            await _get(reader, writer, request)
        finally:
            writer.close()

    async def worker(deadline: float, tally: Tally) -> None:
        await _loop_until(deadline, tally, once)

    return await _run_workers(args, worker)


async def mode_pooled(args: argparse.Namespace) -> dict[str, Any]:
    ctx = _client_context(args.cafile)
    request = _request(args)

    async def worker(deadline: float, tally: Tally) -> None:
        try:
            reader, writer = await _open_tunnel(args, ctx)
        except (OSError, ValueError, asyncio.IncompleteReadError, ssl.SSLError) as e:
            tally.fail(e)
            return
        try:
            await _loop_until(deadline, tally, lambda: _get(reader, writer, request))
        finally:
            writer.close()

    return await _run_workers(args, worker)


async def mode_names(args: argparse.Namespace) -> dict[str, Any]:
    """One CONNECT per name, `--concurrency` at a time; per-name latency and status."""
    host, port = _split(args.proxy)
    names: list[str] = [n for n in args.names.split(",") if n]
    results: list[dict[str, Any]] = [{} for _ in names]
    gate = asyncio.Semaphore(args.concurrency)
    ready = asyncio.Event()

    async def one(index: int, name: str) -> None:
        async with gate:
            await ready.wait()
            target = f"{name}:{args.port}"
            payload = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
            started = time.perf_counter_ns()
            try:
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    writer.write(payload)
                    answer = await reader.read()
                finally:
                    writer.close()
                status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
                results[index] = {"name": name, "status": status}
            except (OSError, ValueError, IndexError) as e:
                results[index] = {"name": name, "status": 0, "error": f"{type(e).__name__}: {e}"}
            results[index]["latency_ms"] = (time.perf_counter_ns() - started) / 1e6

    tasks = [asyncio.create_task(one(i, n)) for i, n in enumerate(names)]
    await asyncio.sleep(0.05)  # let every task reach the gate: a real burst, all at once
    wall0 = time.monotonic()
    ready.set()
    await asyncio.gather(*tasks)
    return {"results": results, "elapsed": time.monotonic() - wall0}


async def mode_serve502(args: argparse.Namespace) -> dict[str, Any]:
    answer = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", args.port, backlog=1024)
    async with server:
        await server.serve_forever()
    return {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.load", description=__doc__)
    modes = parser.add_subparsers(dest="mode", required=True)
    connect = modes.add_parser("connect", help="CONNECT flood, each answered and closed")
    connect.add_argument("--proxy", required=True, help="HOST:PORT of the proxy")
    connect.add_argument("--target", default="gone.example:443")
    connect.add_argument(
        "--expect", type=int, default=502, help="expected status (0: closed, no answer)"
    )
    connect.add_argument("--expect-text", default="", help="text the answer must contain")
    for name in ("tls", "pooled"):
        sub = modes.add_parser(name, help=f"{name} GETs through a tunnel or directly")
        route = sub.add_mutually_exclusive_group(required=True)
        route.add_argument("--proxy", help="HOST:PORT of the proxy (CONNECT name:port)")
        route.add_argument("--direct", help="HOST:PORT of the upstream (no proxy)")
        sub.add_argument("--name", required=True, help="server name: SNI, Host, CONNECT host")
        sub.add_argument("--connect-host", help="CONNECT this host instead of --name")
        sub.add_argument("--port", type=int, required=True, help="upstream port")
        sub.add_argument("--cafile", required=True, help="the only CA the client trusts")
        sub.add_argument("--path", default="/_matrix/federation/v1/version")
        sub.add_argument(
            "--header",
            action="append",
            default=[],
            metavar="'NAME: VALUE'",
            help="an extra request header line (repeatable)",
        )
    for sub in modes.choices.values():
        sub.add_argument("--seconds", type=float, default=3.0)
        sub.add_argument("--concurrency", type=int, default=32)
    names = modes.add_parser("names", help="one timed CONNECT per name")
    names.add_argument("--proxy", required=True)
    names.add_argument("--names", required=True, help="comma-separated; repeats allowed")
    names.add_argument("--port", type=int, default=8448)
    names.add_argument("--concurrency", type=int, default=1)
    serve = modes.add_parser("serve502", help="trivial 502 server (generator ceiling)")
    serve.add_argument("--port", type=int, required=True)
    return parser


MODES: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]]] = {
    "connect": mode_connect,
    "tls": mode_tls,
    "pooled": mode_pooled,
    "names": mode_names,
    "serve502": mode_serve502,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = asyncio.run(MODES[args.mode](args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
