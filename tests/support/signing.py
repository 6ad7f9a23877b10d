"""Matrix signing for fake homeservers: canonical JSON, ed25519 keys, room v10 event hashes.

Real cryptography, so a real Synapse (tests/e2e) and the sidecar's identity checks (unit
and integration tests of sidecar/remote/identity.py) accept what a fake server signs.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY_ID = "ed25519:e2e"
JsonDict = dict[str, Any]

# Room version 10 redaction (the spec's v9 algorithm): what survives, and is thus signed
# and hashed into the event ID.
_KEPT_KEYS = {
    "event_id",
    "type",
    "room_id",
    "sender",
    "state_key",
    "content",
    "hashes",
    "signatures",
    "depth",
    "prev_events",
    "prev_state",
    "auth_events",
    "origin",
    "origin_server_ts",
    "membership",
}
_KEPT_CONTENT = {
    "m.room.member": {"membership", "join_authorised_via_users_server"},
    "m.room.create": {"creator"},
    "m.room.join_rules": {"join_rule", "allow"},
    "m.room.power_levels": {
        "ban",
        "events",
        "events_default",
        "kick",
        "redact",
        "state_default",
        "users",
        "users_default",
    },
    "m.room.history_visibility": {"history_visibility"},
}


def canonical_json(value: object) -> bytes:
    """Matrix canonical JSON (sorted keys, no whitespace, UTF-8)."""
    return json.dumps(
        value, ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False
    ).encode()


def unpadded_b64(data: bytes, urlsafe: bool = False) -> str:
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    return encode(data).decode().rstrip("=")


def redact(event: JsonDict) -> JsonDict:
    kept = {k: copy.deepcopy(v) for k, v in event.items() if k in _KEPT_KEYS}
    allowed = _KEPT_CONTENT.get(event.get("type", ""), set())
    kept["content"] = {k: v for k, v in event.get("content", {}).items() if k in allowed}
    return kept


def content_hash(event: JsonDict) -> str:
    stripped = {
        k: v
        for k, v in event.items()
        if k not in ("age_ts", "unsigned", "signatures", "hashes", "outlier", "destinations")
    }
    return unpadded_b64(hashlib.sha256(canonical_json(stripped)).digest())


def event_id(event: JsonDict) -> str:
    """Room v4+ event ID: URL-safe base64 of the reference hash of the redacted event."""
    pruned = redact(event)
    for key in ("signatures", "age_ts", "unsigned"):
        pruned.pop(key, None)
    return "$" + unpadded_b64(hashlib.sha256(canonical_json(pruned)).digest(), urlsafe=True)


class SigningKey:
    """An ed25519 key of one server name, with Matrix JSON signing."""

    def __init__(self, server_name: str, seed: bytes | None = None) -> None:
        """A fresh random key, or the one `seed` (32 bytes) determines: a fake federation
        in another process derives the same keys from the same seeds, so the test process
        knows every public key without asking."""
        self.server_name = server_name
        if seed is None:
            self._key = Ed25519PrivateKey.generate()
        else:
            self._key = Ed25519PrivateKey.from_private_bytes(seed)
        raw = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public_b64 = unpadded_b64(raw)

    def sign_json(self, value: JsonDict) -> JsonDict:
        """`value` with this server's signature added (signedjson's algorithm)."""
        signable = {k: v for k, v in value.items() if k not in ("signatures", "unsigned")}
        signature = unpadded_b64(self._key.sign(canonical_json(signable)))
        signed = copy.deepcopy(value)
        signed.setdefault("signatures", {}).setdefault(self.server_name, {})[KEY_ID] = signature
        return signed

    def sign_event(self, event: JsonDict) -> JsonDict:
        """Add this server's signature to an event (computed over the redacted event)."""
        pruned = redact(event)
        pruned.pop("age_ts", None)
        pruned.pop("unsigned", None)
        signatures = self.sign_json(pruned)["signatures"]
        signed = copy.deepcopy(event)
        for server, sigs in signatures.items():
            signed.setdefault("signatures", {}).setdefault(server, {}).update(sigs)
        return signed

    def key_document(self) -> JsonDict:
        now_ms = int(time.time() * 1000)
        return self.sign_json(
            {
                "server_name": self.server_name,
                "valid_until_ts": now_ms + 24 * 3600 * 1000,
                "verify_keys": {KEY_ID: {"key": self.public_b64}},
                "old_verify_keys": {},
            }
        )
