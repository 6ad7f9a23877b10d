"""Verdicts shared by every sidecar through Redis (`--store redis://host:6379/0`).

Each verdict is a key (`tombstone:v1:verdict:<name>`, JSON, expiring with the verdict's
stale grace so Redis keeps the TTLs) and a message on `tombstone:v1:verdicts`; every
sidecar subscribes and puts other sidecars' verdicts in its cache, so a verdict learned by
one is used by all within milliseconds. A name no sidecar here has judged is looked up in
Redis first (bounded by FETCH_BUDGET_SECONDS), so replicas do not repeat each other's DNS
work and a restarted pod does not re-learn what its peers know.

Redis is never on the critical path: writes are queued, reads have a deadline of a few
milliseconds and are skipped while Redis is down, and a lost connection is retried with
backoff while the sidecar serves from its own cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sidecar.metrics import Metrics
from sidecar.store import RemoteForget, RemoteVerdict, WriteBehindStore
from sidecar.verdicts import STALE_GRACE_SECONDS, Verdict, from_record, to_record

log = logging.getLogger("sidecar.store")

KEY_PREFIX = "tombstone:v1:verdict:"
KEYS_PREFIX = "tombstone:v1:keys:"  # signing keys recorded while alive (sidecar.identity)
KEYS_TTL_SECONDS = 365 * 86400  # a retired server may come back a year later
KEYS_FETCH_BUDGET_SECONDS = 0.5  # asked at a lift, off the request path
CHANNEL = "tombstone:v1:verdicts"
FETCH_BUDGET_SECONDS = 0.005  # the most a request may wait for Redis ("a few milliseconds")
CONNECT_TIMEOUT_SECONDS = 1.0
COMMAND_TIMEOUT_SECONDS = 2.0  # for background writes; requests never wait this long
RECONNECT_MIN_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 30.0
HEALTH_INTERVAL_SECONDS = 2.0  # how soon a silent outage is noticed
MAX_BATCH = 500  # writes per pipeline round trip


class RedisStore(WriteBehindStore):
    kind = "redis"

    def __init__(self, url: str, metrics: Metrics) -> None:
        super().__init__(metrics)
        self.url = url
        self.origin = uuid.uuid4().hex  # our own messages come back; skip them
        self._client = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
            socket_timeout=COMMAND_TIMEOUT_SECONDS,
            health_check_interval=0,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._key_writes: set[asyncio.Task[None]] = set()
        self.up = False
        self._up.set(0)
        self.detail = f"connecting to {self._safe_url()}"

    def _safe_url(self) -> str:
        """The URL without a password, for logs and /readyz."""
        pool = self._client.connection_pool.connection_kwargs
        return f"redis://{pool.get('host', '?')}:{pool.get('port', 6379)}/{pool.get('db', 0)}"

    async def start(self, on_remote: RemoteVerdict, on_forget: RemoteForget) -> list[Verdict]:
        try:
            await asyncio.wait_for(self._client.ping(), CONNECT_TIMEOUT_SECONDS)
            self.mark(True, f"sharing verdicts through {self._safe_url()}")
        except (RedisError, OSError, TimeoutError) as e:
            self.metrics.store_errors.labels(self.kind, "connect").inc()
            self.mark(False, f"{self._safe_url()} unreachable ({e or type(e).__name__}); "
                             "serving from the local cache, retrying")  # fmt: skip
        self._tasks = [
            asyncio.create_task(self._write_behind()),
            asyncio.create_task(self._subscribe(on_remote, on_forget)),
            asyncio.create_task(self._watch_health()),
        ]
        return []

    async def fetch(self, name: str) -> Verdict | None:
        raw = await self._get(KEY_PREFIX + name, FETCH_BUDGET_SECONDS, "fetch")
        if raw is None:
            return None
        try:
            return from_record(json.loads(raw))
        except (ValueError, TypeError) as e:
            self.metrics.store_errors.labels(self.kind, "decode").inc()
            log.warning("ignoring unreadable verdict for %s in Redis: %s", name, e)
            return None

    async def _get(self, key: str, budget: float, op: str) -> bytes | str | None:
        """GET `key` within `budget`; None when Redis is down, slow or has nothing."""
        if not self.up:
            return None
        try:
            raw = await asyncio.wait_for(self._client.get(key), budget)
        except TimeoutError:
            self.metrics.store_errors.labels(self.kind, f"{op}_timeout").inc()
            return None
        except (RedisError, OSError) as e:
            self._failed(op, e)
            return None
        return raw

    def save_keys(self, name: str, record: dict[str, Any]) -> None:
        if not self.up:
            return  # the local key book has them; a later record shares them again
        task = asyncio.ensure_future(self._set_keys(name, json.dumps(record)))
        self._key_writes.add(task)
        task.add_done_callback(self._key_writes.discard)

    async def _set_keys(self, name: str, payload: str) -> None:
        try:
            await self._client.set(KEYS_PREFIX + name, payload, ex=KEYS_TTL_SECONDS)
        except (RedisError, OSError) as e:
            self._failed("keys", e)

    async def fetch_keys(self, name: str) -> dict[str, Any] | None:
        raw = await self._get(KEYS_PREFIX + name, KEYS_FETCH_BUDGET_SECONDS, "keys")
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            self.metrics.store_errors.labels(self.kind, "decode").inc()
            log.warning("ignoring unreadable signing keys for %s in Redis", name)
            return None
        return data

    async def close(self) -> None:
        await asyncio.gather(*self._key_writes, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pending and self.up:
            await self._flush(self._take())
        await self._client.aclose()

    # -- background tasks -------------------------------------------------------------------

    async def _write_behind(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.up:
                continue  # kept pending; _watch_health wakes us when Redis is back
            batch = self._take()
            if not await self._flush(batch):
                self._put_back(batch)

    async def _flush(self, batch: dict[str, Verdict | None]) -> bool:
        items = list(batch.items())
        now = time.time()
        try:
            for start in range(0, len(items), MAX_BATCH):
                async with self._client.pipeline(transaction=False) as pipe:
                    for name, verdict in items[start : start + MAX_BATCH]:
                        pipe.publish(CHANNEL, self._message(name, verdict))
                        if verdict is None:
                            pipe.delete(KEY_PREFIX + name)
                            continue
                        keep_ms = int((verdict.expires_at + STALE_GRACE_SECONDS - now) * 1000)
                        if keep_ms > 0:
                            pipe.set(KEY_PREFIX + name, json.dumps(to_record(verdict)), px=keep_ms)
                    await pipe.execute()
        except (RedisError, OSError) as e:
            self._failed("write", e)
            return False
        return True

    def _message(self, name: str, verdict: Verdict | None) -> str:
        body: dict[str, Any] = {"origin": self.origin, "destination": name}
        if verdict is not None:
            body["verdict"] = to_record(verdict)
        return json.dumps(body)

    async def _subscribe(self, on_remote: RemoteVerdict, on_forget: RemoteForget) -> None:
        delay = RECONNECT_MIN_SECONDS
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                delay = RECONNECT_MIN_SECONDS
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._receive(message.get("data"), on_remote, on_forget)
            except (RedisError, OSError) as e:
                self._failed("subscribe", e)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    def _receive(self, data: object, on_remote: RemoteVerdict, on_forget: RemoteForget) -> None:
        try:
            body = json.loads(data) if isinstance(data, bytes | str) else None
            if not isinstance(body, dict) or body.get("origin") == self.origin:
                return
            if "verdict" in body:
                on_remote(from_record(body["verdict"]))
            elif isinstance(body.get("destination"), str):
                on_forget(body["destination"])
        except (ValueError, TypeError) as e:
            self.metrics.store_errors.labels(self.kind, "decode").inc()
            log.warning("ignoring unreadable message on %s: %s", CHANNEL, e)

    async def _watch_health(self) -> None:
        delay = HEALTH_INTERVAL_SECONDS
        while True:
            await asyncio.sleep(delay)
            try:
                await asyncio.wait_for(self._client.ping(), CONNECT_TIMEOUT_SECONDS)
            except (RedisError, OSError, TimeoutError) as e:
                self._failed("ping", e)
                delay = min(delay * 2, RECONNECT_MAX_SECONDS)
                continue
            delay = HEALTH_INTERVAL_SECONDS
            if not self.up:
                self.mark(True, f"sharing verdicts through {self._safe_url()} (reconnected)")
                self._wake.set()  # write what piled up while Redis was away

    def _failed(self, op: str, error: BaseException) -> None:
        self.metrics.store_errors.labels(self.kind, op).inc()
        detail = str(error) or type(error).__name__
        self.mark(False, f"{self._safe_url()} failed ({op}: {detail}); serving from the local "
                         "cache, retrying")  # fmt: skip
