"""What a huge pub/sub message and a resync cost a sidecar: `python -m tests.bench.redis_message`.

Starts a real redis-server (its pubsub output limit off, so that Redis does not cut the
subscriber off first), then, in this process:

- `store`: a RedisStore subscribed as the sidecar's is (bounded parser); another process
  PUBLISHes `--size` MiB on the verdict channel; the growth of this process's peak RSS
  (VmHWM, reset first) and the CPU seconds until the message is refused.
- `unbounded`: the same message read by a pub/sub on redis-py's default parser (what the
  store did before the bound), for comparison.
- `resync`: `--keys` verdict keys in Redis, read again as after a gap in the subscription
  (RedisStore._resync): CPU and wall seconds, and how many were applied.

Prints JSON. Needs root or a kernel that lets a process write /proc/self/clear_refs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from sidecar.judge.verdicts import Verdict
from sidecar.metrics import Metrics
from sidecar.store.redis import CHANNEL, KEY_PREFIX, RedisStore
from tests.support.redis_server import RedisServer

# Run in a child process, so that the publisher's copies of the message are not in the
# peak memory measured here.
PUBLISHER = r"""
import socket, sys
port, size, channel = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()
body = b"x" * size
head = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n" % (len(channel), channel, size)
with socket.create_connection(("127.0.0.1", port)) as sock:
    sock.sendall(head + body + b"\r\n")
    assert sock.recv(100) == b":1\r\n"
"""


def memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """VmHWM starts again from VmRSS (Linux 4.0+)."""
    Path("/proc/self/clear_refs").write_text("5")


def publish(port: int, size: int) -> None:
    argv = [sys.executable, "-c", PUBLISHER, str(port), str(size), CHANNEL]
    subprocess.run(argv, check=True)


async def until(done: Any, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError("the message did not arrive")
        await asyncio.sleep(0.01)


async def measure_message(server: RedisServer, size: int, bounded: bool) -> dict[str, Any]:
    """Peak RSS growth and CPU seconds while one message of `size` bytes arrives."""
    store = RedisStore(server.url, Metrics())
    plain = aioredis.Redis.from_url(server.url)
    pubsub = plain.pubsub()
    seen: list[int] = []
    try:
        if bounded:
            await store.start(lambda verdict: None, lambda name: None)
            refused = store.metrics.store_invalid_records.labels("redis", "message")
        else:
            await pubsub.subscribe(CHANNEL)
            await pubsub.get_message(timeout=1.0)  # the confirmation
        reset_peak()
        before, cpu, wall = memory_kib("VmRSS"), time.process_time(), time.monotonic()
        sender = asyncio.ensure_future(asyncio.to_thread(publish, server.port, size))
        if bounded:
            await until(lambda: refused._value.get() >= 1)
        else:
            while not seen:
                message = await pubsub.get_message(timeout=1.0)
                if message is not None and message["type"] == "message":
                    seen.append(len(message["data"]))
                    del message
        result = {
            "peak_growth_kib": memory_kib("VmHWM") - before,
            "cpu_s": round(time.process_time() - cpu, 4),
            "wall_s": round(time.monotonic() - wall, 4),
        }
        await sender
        return result
    finally:
        await pubsub.aclose()
        await plain.aclose()
        if bounded:
            await store.close()


async def measure_resync(server: RedisServer, keys: int) -> dict[str, Any]:
    """One read-again of `keys` verdict keys, as after a gap in the subscription."""
    writer = aioredis.Redis.from_url(server.url)
    now = time.time()
    async with writer.pipeline(transaction=False) as pipe:
        for index in range(keys):
            name = f"resync-{index}.bench.test"
            record = {
                "destination": name,
                "state": "gone",
                "signal": "dns_txt_gone",
                "evidence": "written by the benchmark",
                "observed_at": now,
                "expires_at": now + 3600,
                "addresses": [],
            }
            pipe.set(KEY_PREFIX + name, json.dumps(record), ex=3600)
        await pipe.execute()
    await writer.aclose()
    store = RedisStore(server.url, Metrics())
    applied: list[Verdict] = []
    await store.start(applied.append, lambda name: None)
    try:
        cpu, wall = time.process_time(), time.monotonic()
        await store._resync(time.time(), applied.append, lambda name: None)
        return {
            "keys": keys,
            "applied": len(applied),
            "cpu_s": round(time.process_time() - cpu, 4),
            "wall_s": round(time.monotonic() - wall, 4),
        }
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="message size, MiB")
    parser.add_argument("--keys", type=int, default=10_000, help="verdict keys to resync")
    args = parser.parse_args()
    server = RedisServer().start()
    try:
        server.command("CONFIG", "SET", "client-output-buffer-limit", "pubsub 0 0 0")
        size = args.size * 1024 * 1024
        report = {
            "message_bytes": size,
            "store": asyncio.run(measure_message(server, size, bounded=True)),
            "unbounded": asyncio.run(measure_message(server, size, bounded=False)),
            "resync": asyncio.run(measure_resync(server, args.keys)),
        }
    finally:
        server.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
