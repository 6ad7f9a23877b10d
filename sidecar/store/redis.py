"""Verdicts shared by every sidecar through Redis (`--store redis://host:6379/0`).

Each verdict is a key (`tombstone:v1:verdict:<name>`, JSON, expiring with the verdict's
stale grace so Redis keeps the TTLs) and a message on `tombstone:v1:verdicts`; every
sidecar subscribes and puts other sidecars' verdicts in its cache, so a verdict learned by
one is used by all within milliseconds. A name no sidecar here has judged is looked up in
Redis first (bounded by FETCH_BUDGET_SECONDS), so replicas do not repeat each other's DNS
work and a restarted pod does not re-learn what its peers know.

Whatever comes back from Redis (keys, messages) was written by someone else: it is
validated (sidecar.verdicts.from_record: size, nesting, types, names, addresses) and a bad
record is dropped and counted in `tombstone_store_invalid_records_total`; the subscriber
never dies of one, and a lost subscription shows as the store being down until it is back.
Sizes are bounded where the bytes enter: keys are read with GETRANGE, and the subscriber's
connections refuse a bulk string longer than MAX_MESSAGE_BYTES from its length prefix
(sidecar.store.bounded_resp), so a huge PUBLISH is never buffered: the connection is
dropped unread, the subscriber resubscribes, and the verdict keys are read again
(bounded) to make up for the messages missed meanwhile; a forget also leaves a marker key
(`tombstone:v1:forgotten:<name>`, a day) so that forgets made during a gap are replayed.

Redis is never on the critical path: writes are queued, reads have a deadline of a few
milliseconds and are skipped while Redis is down, and a lost connection is retried with
backoff while the sidecar serves from its own cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from sidecar.judge.verdicts import (
    MAX_MESSAGE_BYTES,
    MAX_RECORD_BYTES,
    STALE_GRACE_SECONDS,
    Verdict,
    decode_record,
    destination_name,
    from_record,
    load_json,
    to_record,
)
from sidecar.metrics import Metrics
from sidecar.remote.identity import MAX_KEY_RECORD_BYTES, KeyRecord
from sidecar.store.base import RateLimitedWarning, RemoteForget, RemoteVerdict, WriteBehindStore
from sidecar.store.bounded_resp import OversizedReply, bounded_parser

log = logging.getLogger("sidecar.store")
_T = TypeVar("_T")

KEY_PREFIX = "tombstone:v1:verdict:"
KEYS_PREFIX = "tombstone:v1:keys:"  # signing keys recorded while alive (sidecar.remote.identity)
KEYS_TTL_SECONDS = 365 * 86400  # a retired server may come back a year later
KEYS_FETCH_BUDGET_SECONDS = 0.5  # asked at a lift, off the request path
CHANNEL = "tombstone:v1:verdicts"
# A forget deletes the verdict key, so a resync could not tell a name forgotten during the
# gap from one never judged: each forget also leaves a marker (its time), kept this long.
FORGOTTEN_PREFIX = "tombstone:v1:forgotten:"
FORGOTTEN_TTL_SECONDS = 86400  # a subscription gap longer than a day misses forgets
MAX_FORGOTTEN_BYTES = 256  # {"forgotten_at": <float>, "origin": <32 hex digits>}
CLOCK_SKEW_SECONDS = 5.0  # between the sidecars' clocks: forgets this early are replayed
FETCH_BUDGET_SECONDS = 0.005  # the most a request may wait for Redis ("a few milliseconds")
CONNECT_TIMEOUT_SECONDS = 1.0
COMMAND_TIMEOUT_SECONDS = 2.0  # for background writes; requests never wait this long
RECONNECT_MIN_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 30.0
HEALTH_INTERVAL_SECONDS = 2.0  # how soon a silent outage is noticed
MAX_BATCH = 500  # writes per pipeline round trip
# An oversized message within this long of resubscribing is part of a flood: the next
# resubscription waits twice as long as the last (a resync each time costs 0.05-0.07 CPU
# seconds per 1,000 keys), instead of starting again from RECONNECT_MIN_SECONDS.
OVERSIZED_QUIET_SECONDS = 60.0
SUBSCRIBER_PROTOCOL = 2  # RESP2: what sidecar.store.bounded_resp parses
INVALID_WARNING_SECONDS = 60.0  # at most one warning a minute about invalid records
# The resync after a gap in the subscription reads at most this many verdict keys, in
# batches of RESYNC_BATCH (one SCAN and one pipelined STRLEN+GETRANGE per key each), and
# gives up after RESYNC_BUDGET_SECONDS: it is off the request path, but a Redis holding
# millions of keys must not keep the subscriber from listening.
RESYNC_MAX_KEYS = 50_000
RESYNC_BATCH = 200
RESYNC_BUDGET_SECONDS = 10.0


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
        # The subscriber has its own connection and no silent retries: redis-py would
        # otherwise reconnect and resubscribe under us, and a lost subscription (messages
        # missed meanwhile) would never show in health. Our loop reconnects, with backoff.
        # Its connections read no bulk string over MAX_MESSAGE_BYTES (whatever parser
        # redis-py would pick, hiredis included) and speak RESP2 (the bounded parser's),
        # whatever the URL or redis-py's default (RESP3 since 8.0) says: the URL's options
        # are taken first and these override them, which from_url would not do.
        options: dict[str, Any] = {
            **parse_url(url),
            "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "health_check_interval": 0,
            "retry": Retry(NoBackoff(), 0),
            "parser_class": bounded_parser(MAX_MESSAGE_BYTES),
            "protocol": SUBSCRIBER_PROTOCOL,
        }
        self._subscriber = aioredis.Redis(connection_pool=aioredis.ConnectionPool(**options))
        self._subscriber.auto_close_connection_pool = True  # as from_url sets it: aclose()
        self._tasks: list[asyncio.Task[None]] = []
        self._key_writes: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._listening = False  # subscribed right now: messages are not being missed
        self._subscribed = asyncio.Event()
        # When the current gap in the subscription began (wall clock, to compare with the
        # forget markers of other sidecars); None while nothing is missed.
        self._gap_since: float | None = None
        self._closing = False
        self._remote: tuple[RemoteVerdict, RemoteForget] | None = None
        self._invalid_warnings = RateLimitedWarning(INVALID_WARNING_SECONDS)
        self._apply_warnings = RateLimitedWarning(INVALID_WARNING_SECONDS)
        self.up = False
        self._up.set(0)
        self.detail = f"connecting to {self._safe_url()}"

    def _safe_url(self) -> str:
        """The URL without a password, for logs and /readyz."""
        pool = self._client.connection_pool.connection_kwargs
        return f"redis://{pool.get('host', '?')}:{pool.get('port', 6379)}/{pool.get('db', 0)}"

    async def start(self, on_remote: RemoteVerdict, on_forget: RemoteForget) -> list[Verdict]:
        reachable = False
        try:
            await asyncio.wait_for(self._client.ping(), CONNECT_TIMEOUT_SECONDS)
            reachable = True
        except (RedisError, OSError, TimeoutError) as e:
            self.metrics.store_errors.labels(self.kind, "connect").inc()
            self._gap_began()  # peers' verdicts of the outage are read once up
            self.mark(
                False,
                f"{self._safe_url()} unreachable ({e or type(e).__name__}); "
                "serving from the local cache, retrying",
            )
        self._remote = (on_remote, on_forget)
        self._tasks = [
            asyncio.create_task(self._write_behind()),
            asyncio.create_task(self._watch_health()),
        ]
        self._start_listener()
        if reachable:  # up only once subscribed: the first shared verdict is not missed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), CONNECT_TIMEOUT_SECONDS)
        return []

    async def fetch(self, name: str) -> Verdict | None:
        raw = await self._get(KEY_PREFIX + name, FETCH_BUDGET_SECONDS, "fetch", MAX_RECORD_BYTES)
        if raw is None:
            return None
        try:
            return _record_of(name, raw)
        except ValueError as e:
            self._invalid("fetch", f"{KEY_PREFIX}{name}: {e}")
            return None

    async def _get(self, key: str, budget: float, op: str, limit: int) -> bytes | None:
        """GET `key` within `budget` and `limit` bytes (never reading more: STRLEN and
        GETRANGE in one round trip); None when Redis is down, slow or has nothing. A key
        too big or not a string is an invalid record, not a Redis failure."""
        if not self.up:
            return None
        try:
            size, raw = await asyncio.wait_for(self._get_range(key, limit), budget)
        except TimeoutError:
            self.metrics.store_errors.labels(self.kind, f"{op}_timeout").inc()
            return None
        except (RedisError, OSError) as e:
            self._failed(op, e)
            return None
        if isinstance(size, ResponseError) or isinstance(raw, ResponseError):
            self._invalid(op, f"{key}: not a string ({size or raw})")
            return None
        if isinstance(size, BaseException) or isinstance(raw, BaseException):
            self._failed(op, size if isinstance(size, BaseException) else raw)
            return None
        if not size:
            return None
        if size > limit or not isinstance(raw, bytes):
            self._invalid(op, f"{key}: {size} bytes; a stored record is at most {limit}")
            return None
        return raw

    async def _get_range(self, key: str, limit: int) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.strlen(key)
            pipe.getrange(key, 0, limit)
            return await pipe.execute(raise_on_error=False)

    def _invalid(self, source: str, detail: str) -> None:
        """A record from Redis failed validation: dropped, counted, and a warning at most
        once a minute (whoever writes bad records cannot flood the log)."""
        self.metrics.store_invalid_records.labels(self.kind, source).inc()
        self._invalid_warnings.warn(
            "ignored %d invalid record(s) from %s (%s) in the last minute; latest: %s",
            self._safe_url(),
            source,
            detail,
        )

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
        key = KEYS_PREFIX + name
        raw = await self._get(key, KEYS_FETCH_BUDGET_SECONDS, "keys", MAX_KEY_RECORD_BYTES)
        if raw is None:
            return None
        try:
            data = load_json(raw, MAX_KEY_RECORD_BYTES)
            if KeyRecord.from_json(data).server_name != name:
                raise ValueError(f"the record is for {data.get('server_name')}")
        except ValueError as e:
            self._invalid("keys", f"{key}: {e}")
            return None
        assert isinstance(data, dict)  # from_json accepted it
        return data

    async def close(self) -> None:
        self._closing = True
        await asyncio.gather(*self._key_writes, return_exceptions=True)
        tasks = [*self._tasks, *([self._listener] if self._listener else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._pending and self.up:
            await self._flush(self._take())
        await self._subscriber.aclose()
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
                            marker = json.dumps({"forgotten_at": now, "origin": self.origin})
                            pipe.set(FORGOTTEN_PREFIX + name, marker, ex=FORGOTTEN_TTL_SECONDS)
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

    def _start_listener(self) -> None:
        if self._closing or self._remote is None:
            return
        self._listener = asyncio.create_task(self._subscribe(*self._remote))
        self._listener.add_done_callback(self._listener_ended)

    def _listener_ended(self, task: asyncio.Task[None]) -> None:
        """The subscriber loop never returns on its own: if it ended anyway (cancelled from
        outside, an exception that is not an Exception), say so and start it again."""
        self._listening = False
        self._subscribed.clear()
        self._gap_began()
        if self._closing:
            return
        why = "cancelled" if task.cancelled() else repr(task.exception())
        self.metrics.store_errors.labels(self.kind, "subscribe").inc()
        self.mark(False, f"the subscriber to {CHANNEL} stopped ({why}); restarting it")
        asyncio.get_running_loop().call_later(RECONNECT_MIN_SECONDS, self._start_listener)

    async def _subscribe(self, on_remote: RemoteVerdict, on_forget: RemoteForget) -> None:
        delay = RECONNECT_MIN_SECONDS
        flood = False  # oversized messages keep coming: the backoff is not reset
        while True:
            pubsub = self._subscriber.pubsub()
            since = time.monotonic()
            try:
                await asyncio.wait_for(self._confirmed(pubsub), CONNECT_TIMEOUT_SECONDS)
                self._listening = True
                self._subscribed.set()
                if not flood:
                    delay = RECONNECT_MIN_SECONDS
                since, flood = time.monotonic(), False
                if not self.up:
                    self.mark(True, f"sharing verdicts through {self._safe_url()}")
                    self._wake.set()  # write what piled up while Redis was away
                if self._gap_since is not None:  # messages from now on wait behind it
                    await self._resync(self._gap_since, on_remote, on_forget)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._receive(message.get("data"), on_remote, on_forget)
            except OversizedReply as e:
                # Not an outage: Redis works, one publisher does not. The body was never
                # read; the connection goes with it and the keys make up for the gap.
                self._gap_began()
                self._invalid("message", f"{CHANNEL}: {e}; dropped unread, resubscribing")
                # Each one costs a reconnect and a resync: when they keep coming, the
                # resubscriptions back off as after failures (up to RECONNECT_MAX_SECONDS).
                flood = time.monotonic() - since < OVERSIZED_QUIET_SECONDS
            except (RedisError, OSError, TimeoutError) as e:
                self._lost_subscription(e)
            except Exception as e:  # a bug must not end the subscriber (nor go unseen)
                log.warning("the subscriber to %s failed; resubscribing", CHANNEL, exc_info=True)
                self._lost_subscription(e)
            finally:
                self._listening = False
                self._subscribed.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    @staticmethod
    async def _confirmed(pubsub: PubSub) -> None:
        """Subscribe and wait for Redis to confirm it: SUBSCRIBE is sent without waiting
        for its answer, and a refusal (NOPERM) arrives only with the next read."""
        await pubsub.subscribe(CHANNEL)
        while True:
            message = await pubsub.get_message(timeout=CONNECT_TIMEOUT_SECONDS)
            if message is not None and message.get("type") == "subscribe":
                return

    def _lost_subscription(self, error: BaseException) -> None:
        self._listening = False
        self._gap_began()
        self._failed("subscribe", error)

    def _gap_began(self) -> None:
        """Messages may be missed from now on (kept if a gap is already open)."""
        if self._gap_since is None:
            self._gap_since = time.time()

    async def _resync(
        self, since: float, on_remote: RemoteVerdict, on_forget: RemoteForget
    ) -> None:
        """Read the shared verdicts again after a gap in the subscription (which began at
        `since`), so what the other sidecars published meanwhile is not lost: verdicts
        (older ones change nothing: the policy keeps the newer of two), then the forgets
        made during the gap of names that have no verdict since. Bounded in keys, bytes
        and time; the gap stays open (tried again next time) only if Redis failed."""
        forgotten: dict[str, float] = {}
        try:
            async with asyncio.timeout(RESYNC_BUDGET_SECONDS):
                await self._scan(FORGOTTEN_PREFIX, MAX_FORGOTTEN_BYTES, forgotten.update)
                forgotten = {
                    name: at for name, at in forgotten.items() if at >= since - CLOCK_SKEW_SECONDS
                }
                complete = await self._scan(
                    KEY_PREFIX,
                    MAX_RECORD_BYTES,
                    lambda found: self._apply_keys(found, on_remote, forgotten),
                )
        except TimeoutError:
            self.metrics.store_errors.labels(self.kind, "resync_timeout").inc()
            complete = False  # what was read is applied; the rest is fetched when asked for
        except OversizedReply as e:  # a key name of many kilobytes: not ours
            self._invalid("resync", f"{KEY_PREFIX}*: {e}")
            complete = False  # it would be refused again; names are still fetched on demand
        except (RedisError, OSError) as e:
            self.metrics.store_errors.labels(self.kind, "resync").inc()
            log.debug("resync after resubscribing failed: %s", e)
            return
        self._gap_since = None
        if not complete:
            return  # a name's newer verdict may be among the keys not read: no forgets
        for name in forgotten:  # forgotten during the gap, and no verdict since
            self._apply_read_again(on_forget, name, name, "forget(s)")

    async def _scan(self, prefix: str, limit: int, take: Callable[[dict[str, Any]], None]) -> bool:
        """SCAN the keys under `prefix` on the subscriber's bounded connections (a key name
        is outside input too), reading at most `limit` bytes of each and at most
        RESYNC_MAX_KEYS keys; `take` gets each batch's valid values by name. True when
        every key was read."""
        cursor, seen = 0, 0
        while seen < RESYNC_MAX_KEYS:
            cursor, keys = await self._subscriber.scan(
                cursor, match=prefix + "*", count=RESYNC_BATCH
            )
            keys = keys[: RESYNC_MAX_KEYS - seen]
            seen += len(keys)
            if keys:
                async with self._subscriber.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.strlen(key)
                        pipe.getrange(key, 0, limit)
                    replies = await pipe.execute(raise_on_error=False)
                found: dict[str, Any] = {}
                for index, key in enumerate(keys):
                    text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
                    value = self._read_value(
                        text, prefix, limit, replies[2 * index], replies[2 * index + 1]
                    )
                    if value is not None:
                        found[text[len(prefix) :]] = value
                take(found)
            if cursor == 0:
                return True
        return False

    def _read_value(
        self, key: str, prefix: str, limit: int, size: object, raw: object
    ) -> Verdict | float | None:
        """One key read by the resync, validated: a verdict or a forget's time; None (and
        counted when invalid) otherwise."""
        name = key[len(prefix) :]
        try:
            if not isinstance(size, int) or not isinstance(raw, bytes):
                raise ValueError(f"not a string ({size!r})")
            if not size:
                return None  # deleted or expired since the SCAN
            if size > limit:
                raise ValueError(f"{size} bytes; a stored record is at most {limit}")
            if prefix == FORGOTTEN_PREFIX:
                destination_name(name)
                body = load_json(raw, limit)
                at = body.get("forgotten_at") if isinstance(body, dict) else None
                if isinstance(at, bool) or not isinstance(at, int | float):
                    raise ValueError("no forgotten_at time")
                if not math.isfinite(at):
                    raise ValueError(f"forgotten_at is {at}")
                if body.get("origin") == self.origin:
                    return None  # our own forget: applied here when it was made
                return float(at)
            return _record_of(name, raw)
        except ValueError as e:
            self._invalid("resync", f"{key[:150]}: {e}")
            return None

    def _apply_keys(
        self, verdicts: dict[str, Any], on_remote: RemoteVerdict, forgotten: dict[str, float]
    ) -> None:
        """Verdicts read by the resync: applied; a name with one is not forgotten."""
        for name, verdict in verdicts.items():
            forgotten.pop(name, None)  # judged again since it was forgotten
            self._apply_read_again(on_remote, verdict, name, "verdict(s)")

    def _apply_read_again(
        self, apply: Callable[[_T], None], value: _T, name: str, what: str
    ) -> None:
        """Hand one value the resync read to the cache; the cache's own bug is counted and
        logged (one warning a minute), and the resync goes on."""
        try:
            apply(value)
        except Exception:
            self.metrics.store_errors.labels(self.kind, "apply").inc()
            self._apply_warnings.warn(
                f"%d {what} read again from %s could not be applied (latest for %s)",
                self._safe_url(),
                name,
                exc_info=True,
            )

    def _receive(self, data: object, on_remote: RemoteVerdict, on_forget: RemoteForget) -> None:
        """Apply one message from another sidecar; a bad one is dropped and counted, never
        raised: the subscriber outlives whatever is published on the channel."""
        try:
            body = load_json(data, MAX_MESSAGE_BYTES)
            if not isinstance(body, dict):
                raise ValueError(f"expected an object, got {type(body).__name__}")
            if body.get("origin") == self.origin:
                return
            destination = destination_name(body.get("destination"))
            verdict = from_record(body["verdict"]) if "verdict" in body else None
            if verdict is not None and verdict.destination != destination:
                raise ValueError(f"the verdict is for {verdict.destination}, not {destination}")
        except ValueError as e:
            self._invalid("message", f"{CHANNEL}: {e}")
            return
        try:
            if verdict is not None:
                on_remote(verdict)
            else:
                on_forget(destination)
        except Exception:  # the cache's own bug: counted, logged, the subscriber goes on
            self.metrics.store_errors.labels(self.kind, "apply").inc()
            self._apply_warnings.warn(
                "%d message(s) from %s could not be applied (latest for %s)",
                CHANNEL,
                destination,
                exc_info=True,
            )

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
            if not self.up and self._listening:  # the subscriber marks up once resubscribed
                self.mark(True, f"sharing verdicts through {self._safe_url()} (reconnected)")
                self._wake.set()  # write what piled up while Redis was away

    def _failed(self, op: str, error: BaseException) -> None:
        self.metrics.store_errors.labels(self.kind, op).inc()
        detail = str(error) or type(error).__name__
        self.mark(
            False,
            f"{self._safe_url()} failed ({op}: {detail}); serving from the local cache, retrying",
        )


def _record_of(name: str, raw: object) -> Verdict:
    """The verdict stored under `name`'s key (ValueError: invalid, or another name's)."""
    verdict = decode_record(raw)
    if verdict.destination != name:
        raise ValueError(f"the record is for {verdict.destination}")
    return verdict
