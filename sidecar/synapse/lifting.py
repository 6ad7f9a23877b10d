"""What happens around a lifted verdict: identity check, Synapse's backoff, resume early.

- Before a gone verdict is lifted, `guard` compares the server's signing keys with those
  recorded while it was alive (sidecar.remote.identity) and, with `--hold-reborn`, keeps a
  re-keyed server suppressed until an operator lifts it (ops DELETE).
- After it is lifted, `lifted` asks Synapse (`--synapse-admin-url`) to reset its backoff
  for the name, so federation resumes now instead of after up to a week.
- `poll_synapse` watches Synapse's destinations: when one we hold gone stops backing off
  in Synapse (inbound traffic from it reset its timings: MSC4188 "resume early"), the
  verdict is checked again at once instead of at its TTL.

None of it changes a proxy decision except the explicit hold.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sidecar.judge.names import InvalidName, parse_authority
from sidecar.judge.signals import Signal
from sidecar.judge.verdicts import Verdict
from sidecar.metrics import Metrics
from sidecar.remote.identity import KeyBook, KeyDocumentError, KeyFetcher, KeyRecord, Resurrection
from sidecar.synapse.admin import AdminError, SynapseAdmin

if TYPE_CHECKING:
    from sidecar.judge.policy import Policy
    from sidecar.store.base import VerdictStore

log = logging.getLogger("sidecar.lifting")

DEFAULT_KEY_PORT = 8448  # where a name without a recorded target is asked for its keys
YIELD_EVERY = 200  # destinations compared per turn of the event loop (~2 ms at most)
HOLD_EVIDENCE = "held: back with new signing keys"  # starts a hold's evidence, on every replica


def is_hold(verdict: Verdict) -> bool:
    """A `--hold-reborn` hold, whichever replica raised it (the evidence says so)."""
    return verdict.evidence.startswith(HOLD_EVIDENCE)


@dataclass(frozen=True)
class SynapseView:
    """What the last poll of Synapse's destinations saw, for /v1/synapse."""

    polled_at: float | None
    destinations: int
    truncated: bool
    backing_off_gone: tuple[str, ...]  # gone here, and Synapse backs off them


class Lifter:
    """Identity checks, holds, Synapse resets and resume-early polling for one sidecar."""

    def __init__(
        self,
        metrics: Metrics,
        book: KeyBook,
        *,
        fetcher: KeyFetcher | None = None,
        admin: SynapseAdmin | None = None,
        store: VerdictStore | None = None,
        hold_reborn: bool = False,
        poll_interval: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.book = book
        self.fetcher = fetcher
        self.admin = admin
        self.hold_reborn = hold_reborn
        self.poll_interval = poll_interval
        self._clock = clock
        self._released: set[str] = set()
        self._backing_off: dict[str, bool] = {}
        self.view = SynapseView(None, 0, False, ())
        self._tasks: set[asyncio.Task[Any]] = set()
        self.store = store  # shares key records (--store redis)

    # -- identity -------------------------------------------------------------------------

    def observe_keys(
        self, name: str, body: bytes, target: tuple[str, int] | None, sni: str | None = None
    ) -> None:
        """A key document of an alive name: seen through the sidecar (intercept mode), or
        the answer to a pass-through probe's key request at `target` (as host `sni`, the
        one a well-known delegates to, when it is not the name)."""
        try:
            found = _parse(body, name, target, self._clock())
        except KeyDocumentError as e:
            log.debug("not recording keys of %s: %s", name, e)
            return
        self._remember(found if sni in (None, name) else dataclasses.replace(found, sni=sni))

    def _remember(self, found: KeyRecord) -> None:
        """Record `found` here and share it: another sidecar may see the lift."""
        self.book.record(found)
        if self.store is not None:
            self.store.save_keys(found.server_name, found.to_json())

    async def _shared_record(self, name: str) -> KeyRecord | None:
        """Keys another sidecar recorded for `name` (a replica that saw it alive)."""
        if self.store is None:
            return None
        data = await self.store.fetch_keys(name)
        if data is None:
            return None
        try:
            record = KeyRecord.from_json(data)
        except (ValueError, TypeError, AttributeError) as e:
            log.warning("ignoring shared signing keys of %s: %s", name, e)
            return None
        return record if record.server_name == name else None

    def release(self, name: str, current: Verdict | None = None) -> bool:
        """An operator lifts `name` (ops DELETE): if it was held — here, or by another
        sidecar whose hold reached this one through the shared store (`current`) —
        accept its new identity."""
        held_here = self.book.release(name)
        held_elsewhere = current is not None and is_hold(current)
        if held_here or held_elsewhere:
            self._released.add(name)
            log.warning("%s released by an operator: its new signing keys are accepted", name)
            return True
        return False

    def release_done(self, name: str) -> None:
        """The operator's re-check is over: a later lift of `name` is compared again."""
        self._released.discard(name)

    async def guard(self, name: str, previous: Verdict, alive: Verdict) -> str | None:
        """`name` is about to be lifted (it was `previous`, DNS now says `alive`): compare
        its keys; the evidence for a hold, or None to lift. Never raises."""
        now = self._clock()
        record = self.book.records.get(name) or await self._shared_record(name)
        target = record.target if record is not None and record.target else (name, DEFAULT_KEY_PORT)
        current: KeyRecord | None = None
        problem = ""
        # Nothing recorded, nothing to compare: then no request of our own to the server
        # (unless an operator just released it: its keys now are the ones to remember).
        wanted = record is not None or name in self._released
        if wanted and self.fetcher is not None:
            try:
                current = await self.fetcher.fetch(name, target, now)
            except (KeyDocumentError, OSError, TimeoutError, ValueError) as e:
                problem = str(e) or type(e).__name__
        if name in self._released:
            self._released.discard(name)
            if current is not None:
                self._remember(current)
            return None
        if record is None or current is None:
            changed = "unknown"
            detail = (
                "no signing keys were recorded while it was alive"
                if record is None
                else f"its keys could not be fetched now: {problem}"
            )
        elif record.same_identity(current):
            changed, detail = "false", f"same signing keys ({_ids(current)})"
        else:
            changed = "true"
            detail = (
                f"new signing keys {_ids(current)}; while alive it had {_ids(record)} "
                f"(recorded {time.strftime('%Y-%m-%d %H:%M', time.gmtime(record.seen_at))}"
                " UTC)"
            )
        if current is not None and changed != "true":
            self._remember(current)
        held = changed == "true" and self.hold_reborn
        self.metrics.resurrections.labels(changed).inc()
        self.book.add_resurrection(Resurrection(name, changed, detail, now, held))
        was = f"{previous.signal}: {previous.evidence}"
        if changed == "true":
            log.warning(
                "RESURRECTION WITH A NEW IDENTITY: %s was gone (%s) and is back with %s. "
                "Whoever runs it now is not who ran it before; review its users' power in "
                "shared rooms. %s",
                name,
                was,
                detail,
                "Still suppressed (--hold-reborn) until an operator lifts it: "
                f"tombstone-sidecar verdicts forget {name}"
                if held
                else "Not held (no --hold-reborn): traffic to it flows again.",
            )
            if held:
                return f"{HOLD_EVIDENCE} ({detail}); lift with ops DELETE"
            return None
        # The policy logs the lift itself: one line per verdict change.
        log.debug("%s is back (was %s): %s", name, was, detail)
        return None

    # -- Synapse ------------------------------------------------------------------------

    def lifted(self, old: Verdict, new: Verdict) -> None:
        """A verdict was lifted: ask Synapse to stop backing off the name (background)."""
        if self.admin is None:
            return
        admin, name = self.admin, new.destination

        async def run() -> None:
            try:
                result = await admin.reset_connection(name)
            except AdminError as e:
                log.debug("could not reset Synapse's backoff for %s: %s", name, e)
                return
            if result == "ok":
                log.info("%s lifted: Synapse's backoff for it was reset (reset_connection)", name)
            else:
                log.debug("%s lifted: Synapse was not backing off it", name)

        self._spawn(run())

    async def poll_synapse(self, current: Callable[[], Policy | None]) -> None:
        """Every poll interval: look for gone names Synapse has stopped backing off (the
        policy is looked up each time: a reconfiguration may replace it)."""
        while True:
            policy = current()
            if policy is not None:
                await self.poll_once(policy)
            await asyncio.sleep(self.poll_interval)

    async def poll_once(self, policy: Policy) -> list[str]:
        """One poll; the names whose verdicts it started re-checking."""
        admin = self.admin
        if admin is None:  # turned off by a reconfiguration
            return []
        try:
            rows, truncated = await admin.destinations()
        except AdminError:
            return []  # logged once per state change by the client
        seen: dict[str, bool] = {}
        resumed: list[str] = []
        for number, row in enumerate(rows, 1):
            if number % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # the proxy shares this event loop
            try:
                name = parse_authority(row.destination).host
            except InvalidName:
                continue
            # Only what the cache judged gone (never operator verdicts): a dict probe per
            # row, not a scan of the whole cache.
            entry = policy.cache.get(name) if name in policy.cache else None
            if entry is None or not entry.verdict.suppresses:
                continue
            if entry.verdict.signal == Signal.OPERATOR:
                continue
            backing_off = row.backing_off or seen.get(name, False)
            seen[name] = backing_off
            if self._backing_off.get(name) and not backing_off and name not in resumed:
                resumed.append(name)
        self._backing_off = seen
        self.view = SynapseView(
            self._clock(), len(rows), truncated, tuple(sorted(n for n, b in seen.items() if b))
        )
        for name in resumed:
            self.metrics.resumed_early.inc()
            log.info(
                "Synapse stopped backing off %s (inbound traffic from it reset its retry "
                "timings): checking the verdict now, not at its TTL",
                name,
            )
            self._spawn(policy.recheck(name))
        return resumed

    # -- plumbing ------------------------------------------------------------------------

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.book.close()


def _parse(body: bytes, name: str, target: tuple[str, int] | None, now: float) -> KeyRecord:
    from sidecar.remote.identity import parse_key_document

    return parse_key_document(body, frozenset({name}), target, now)


def _ids(record: KeyRecord) -> str:
    return ", ".join(f"{key_id} {key[:8]}…" for key_id, key in record.keys)
