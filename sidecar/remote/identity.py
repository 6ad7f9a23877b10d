"""Signing keys per server name, and resurrection alerts (issue 9, part 3).

A domain that comes back after its tombstone may have a new owner. While a server is
alive, the sidecar records the ed25519 keys it publishes at `/_matrix/key/v2/server`
(seen through the sidecar in intercept mode, or fetched where a pass-through probe found
its federation API); only self-signed documents for the name they were fetched for
count. When a gone verdict is about to be lifted, the keys are fetched again: a server
that kept at least one of the recorded keys (in `verify_keys`, or in `old_verify_keys`
after a proper rotation) is the same server; one that publishes none of them is a
**resurrection with a new identity**.

This is an alert, not a shield: the sidecar sees only the homeserver's outbound traffic,
so it cannot stop a reborn server's inbound events, and a server that never talked
through the sidecar while alive has no record to compare.

Records live in `signing-keys.json` beside the verdict file in --state-dir (none with
`--store memory`), written behind, atomically, at most once per WRITE_DELAY_SECONDS.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import math
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sidecar.judge.verdicts import MAX_TIMESTAMP, check_depth, destination_name
from sidecar.remote import http1

log = logging.getLogger("sidecar.identity")

KEY_PATH = "/_matrix/key/v2/server"
FILE_NAME = "signing-keys.json"
MAX_KEY_DOCUMENT_BYTES = 64 * 1024  # a key document is a few hundred bytes
# A stored key record is a subset of one document, so it fits the same bound; a real server
# publishes one or two keys, a few hundred over years of rotation is already absurd.
MAX_KEY_RECORD_BYTES = MAX_KEY_DOCUMENT_BYTES
MAX_KEYS_PER_RECORD = 256
MAX_RECORDS = 100_000  # names whose keys are remembered; the oldest go first beyond this
MAX_RESURRECTIONS = 1000  # kept for /v1/resurrections; the oldest go first
WRITE_DELAY_SECONDS = 2.0  # gather new records this long into one file write

Resolve = Callable[[str], Awaitable[tuple[str, ...]]]


class KeyDocumentError(ValueError):
    """Why a key document cannot be used as evidence of identity."""


@dataclass(frozen=True)
class KeyRecord:
    """The keys a server published while alive, and where they were fetched."""

    server_name: str
    keys: tuple[tuple[str, str], ...]  # (key id, unpadded base64 public key), sorted
    old_keys: tuple[tuple[str, str], ...]  # old_verify_keys: retired but still its own
    seen_at: float
    target: tuple[str, int] | None = None  # host, port the document came from
    sni: str | None = None  # the host named in TLS there when not the server (delegation)

    def same_identity(self, now: KeyRecord) -> bool:
        """True when `now` still vouches for a recorded key (current or rotated out)."""
        return bool(set(self.keys) & (set(now.keys) | set(now.old_keys)))

    def to_json(self) -> dict[str, Any]:
        return {
            "server_name": self.server_name,
            "keys": dict(self.keys),
            "old_keys": dict(self.old_keys),
            "seen_at": self.seen_at,
            "target": list(self.target) if self.target else None,
            "sni": self.sni,
        }

    @classmethod
    def from_json(cls, data: Any) -> KeyRecord:
        """A record read back from the key file or a shared store: validated like a verdict
        record (flat, a normalized name, string keys, a finite time, a real port);
        ValueError says what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("a key record must be an object")
        check_depth(data, 2)
        server = destination_name(data.get("server_name"))
        seen_at = data.get("seen_at", 0.0)
        if isinstance(seen_at, bool) or not isinstance(seen_at, int | float):
            raise ValueError("seen_at must be a number")
        try:
            seen = float(seen_at)
        except OverflowError:
            raise ValueError("seen_at is beyond the range of a float") from None
        if not (math.isfinite(seen) and 0 <= seen <= MAX_TIMESTAMP):
            raise ValueError("seen_at is not a time between 1970 and 9999")
        return cls(
            server,
            _stored_keys(data.get("keys"), "keys"),
            _stored_keys(data.get("old_keys"), "old_keys"),
            seen,
            _stored_target(data.get("target")),
            None if data.get("sni") is None else destination_name(data.get("sni")),
        )


def _stored_keys(value: Any, field_name: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > MAX_KEYS_PER_RECORD:
        raise ValueError(f"{field_name} must be an object of at most {MAX_KEYS_PER_RECORD} keys")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"{field_name} must map key ids to strings")
    return tuple(sorted(value.items()))


def _stored_target(value: Any) -> tuple[str, int] | None:
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 2):
        raise ValueError("target must be [host, port] or null")
    host, port = value
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError("target port must be a number from 1 to 65535")
    return destination_name(host), port


@dataclass(frozen=True)
class Resurrection:
    """A gone destination that came back: with its old keys, new ones, or unknown ones."""

    destination: str
    key_changed: str  # "true" | "false" | "unknown"
    detail: str
    observed_at: float
    held: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "key_changed": self.key_changed,
            "detail": self.detail,
            "observed_at": self.observed_at,
            "held": self.held,
        }


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _canonical(value: Any) -> bytes:
    return json.dumps(
        value, ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False
    ).encode()


def parse_key_document(
    body: bytes, names: frozenset[str], target: tuple[str, int] | None, now: float
) -> KeyRecord:
    """A `/_matrix/key/v2/server` answer whose `server_name` is one of `names` and which
    is signed by one of its own `verify_keys`; KeyDocumentError otherwise."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise KeyDocumentError(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise KeyDocumentError("not a JSON object")
    server = doc.get("server_name")
    if not isinstance(server, str) or server.lower() not in names:
        raise KeyDocumentError(f"server_name {str(server)[:100]!r} is not {sorted(names)}")
    keys = _key_map(doc.get("verify_keys"), "verify_keys")
    old = _key_map(doc.get("old_verify_keys") or {}, "old_verify_keys")
    if not keys:
        raise KeyDocumentError("no verify_keys")
    signatures = doc.get("signatures")
    mine = signatures.get(server) if isinstance(signatures, dict) else None
    if not isinstance(mine, dict):
        raise KeyDocumentError("not signed by the server itself")
    signable = _canonical({k: v for k, v in doc.items() if k not in ("signatures", "unsigned")})
    for key_id, signature in mine.items():
        if key_id not in keys or not isinstance(signature, str):
            continue
        try:
            Ed25519PublicKey.from_public_bytes(_unb64(keys[key_id])).verify(
                _unb64(signature), signable
            )
        except (InvalidSignature, ValueError, binascii.Error):
            continue
        return KeyRecord(
            server.lower(), tuple(sorted(keys.items())), tuple(sorted(old.items())), now, target
        )
    raise KeyDocumentError("no valid self-signature by a key in verify_keys")


def _key_map(value: Any, field_name: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise KeyDocumentError(f"{field_name} is not an object")
    keys = {}
    for key_id, entry in value.items():
        key = entry.get("key") if isinstance(entry, dict) else None
        if isinstance(key_id, str) and key_id.startswith("ed25519:") and isinstance(key, str):
            keys[key_id] = key
    return keys


@dataclass
class KeyBook:
    """Recorded keys by server name, resurrections seen, and names held for an operator."""

    path: Path | None
    records: dict[str, KeyRecord] = field(default_factory=dict)
    resurrections: list[Resurrection] = field(default_factory=list)
    held: set[str] = field(default_factory=set)
    _dirty: bool = False
    _writer: asyncio.Task[None] | None = None

    def load(self) -> None:
        """Read the file; a missing one is empty, one that is not a key file is set aside
        with a warning; records that fail validation are dropped (one warning for all)."""
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            raw_records, raw_held = data.get("records", []), data.get("held", [])
            if not isinstance(raw_records, list) or not isinstance(raw_held, list):
                raise ValueError("records and held must be lists")
        except (OSError, ValueError, RecursionError) as e:
            aside = self.path.with_suffix(f".broken-{int(time.time())}")
            log.warning(
                "cannot read %s (%s); moved it to %s, starting without recorded keys",
                self.path,
                str(e)[:200],
                aside,
            )
            with contextlib.suppress(OSError):  # a read-only directory: just do not use it
                self.path.replace(aside)
            return
        records: list[KeyRecord] = []
        held: set[str] = set()
        bad, first = 0, ""
        for raw in raw_records[-MAX_RECORDS:]:
            try:
                records.append(KeyRecord.from_json(raw))
            except ValueError as e:
                bad, first = bad + 1, first or str(e)
        for name in raw_held:
            try:
                held.add(destination_name(name))
            except ValueError as e:
                bad, first = bad + 1, first or str(e)
        if bad:
            log.warning("dropped %d invalid entries in %s (first: %s)", bad, self.path, first)
        self.records = {r.server_name: r for r in records}
        self.held = held
        if self.records:
            log.info("%d servers' signing keys loaded from %s", len(self.records), self.path)

    def record(self, found: KeyRecord) -> None:
        previous = self.records.pop(found.server_name, None)
        if previous is not None and (previous.keys, previous.old_keys) == (
            found.keys,
            found.old_keys,
        ):
            if found.target is None:  # no place given: keep where the keys were fetched
                found = dataclasses.replace(found, target=previous.target, sni=previous.sni)
        elif previous is not None:
            log.info(
                "%s publishes new signing keys while alive: %s",
                found.server_name,
                ", ".join(k for k, _ in found.keys),
            )
        self.records[found.server_name] = found
        while len(self.records) > MAX_RECORDS:
            self.records.pop(next(iter(self.records)))
        self.changed()

    def add_resurrection(self, event: Resurrection) -> None:
        self.resurrections.append(event)
        del self.resurrections[:-MAX_RESURRECTIONS]
        if event.held:
            self.held.add(event.destination)
            self.changed()

    def release(self, name: str) -> bool:
        """An operator lifted a held name: its new keys become the recorded ones."""
        if name not in self.held:
            return False
        self.held.discard(name)
        self.records.pop(name, None)  # re-recorded from the lift's fetch
        self.changed()
        return True

    def changed(self) -> None:
        self._dirty = True
        if self.path is not None and self._writer is None:
            with contextlib.suppress(RuntimeError):  # no loop (a unit test): write at close
                self._writer = asyncio.get_running_loop().create_task(self._write_later())

    async def _write_later(self) -> None:
        try:
            await asyncio.sleep(WRITE_DELAY_SECONDS)
            await asyncio.get_running_loop().run_in_executor(None, self.flush)
        finally:
            self._writer = None

    def flush(self) -> None:
        """Write the file now (atomically); a failure is a warning, the records stay."""
        if self.path is None or not self._dirty:
            return
        self._dirty = False
        data = {
            "records": [r.to_json() for r in list(self.records.values())],
            "held": sorted(self.held),
        }
        temporary = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(data), encoding="utf-8")
            os.replace(temporary, self.path)
        except OSError as e:
            self._dirty = True
            log.warning("cannot write %s: %s; keeping signing keys in memory", self.path, e)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None
        self.flush()


class KeyFetcher:
    """Fetches `/_matrix/key/v2/server` the way a remote homeserver would (TLS verified)."""

    def __init__(
        self,
        context: ssl.SSLContext,
        timeout: float,
        resolve: Resolve,
        choose: Callable[[tuple[str, ...]], str | None],
        sni_for: Callable[[str, tuple[str, int]], str] | None = None,
    ) -> None:
        """`sni_for(name, target)`: the host to name in SNI and Host there (a delegated
        host, as discovery found it); the server name itself when not given."""
        self._context = context
        self._timeout = timeout
        self._resolve = resolve
        self._choose = choose
        self._sni_for = sni_for

    async def fetch(self, name: str, target: tuple[str, int], now: float) -> KeyRecord:
        """`name`'s keys from `target` (TLS SNI and Host: the server name, or the host its
        well-known delegates to, as Synapse sends them); the document must be `name`'s.
        KeyDocumentError (or OSError, ssl.SSLError, TimeoutError) says why not."""
        host, port = target
        sni = self._sni_for(name, target) if self._sni_for is not None else name
        address = self._choose(await self._resolve(host))
        if address is None:
            raise KeyDocumentError(f"{host}: no address the policy allows")
        reply = await http1.request(
            address,
            port,
            "GET",
            KEY_PATH,
            host_header=sni if port == 443 else f"{sni}:{port}",
            headers={"User-Agent": "tombstone-sidecar-keys"},
            tls=self._context,
            server_hostname=sni,
            seconds=self._timeout,
            limit=MAX_KEY_DOCUMENT_BYTES,
        )
        if reply.status != 200:
            raise KeyDocumentError(f"https://{host}:{port}{KEY_PATH} answered {reply.status}")
        found = parse_key_document(reply.body, frozenset({name}), target, now)
        return found if sni == name else dataclasses.replace(found, sni=sni)
