"""Signing-key documents and records: what counts as evidence of a server's identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.remote.identity import (
    KeyBook,
    KeyDocumentError,
    KeyRecord,
    Resurrection,
    parse_key_document,
)
from tests.support.signing import SigningKey

NAME = "old.example.org"


def document(key: SigningKey, **changes: object) -> bytes:
    doc = {**key.key_document(), **changes}
    return json.dumps(doc).encode()


def test_a_self_signed_document_is_recorded_with_its_keys_and_target() -> None:
    key = SigningKey(NAME)
    record = parse_key_document(document(key), frozenset({NAME}), (NAME, 8448), 100.0)
    assert record.server_name == NAME
    assert record.keys == (("ed25519:e2e", key.public_b64),)
    assert record.target == (NAME, 8448) and record.seen_at == 100.0


def test_a_document_for_another_name_is_not_evidence() -> None:
    other = SigningKey("elsewhere.example.org")
    with pytest.raises(KeyDocumentError, match="is not"):
        parse_key_document(document(other), frozenset({NAME}), None, 0.0)


def test_a_document_signed_by_a_key_it_does_not_publish_is_not_evidence() -> None:
    real, impostor = SigningKey(NAME), SigningKey(NAME)
    forged = impostor.sign_json({k: v for k, v in real.key_document().items() if k != "signatures"})
    with pytest.raises(KeyDocumentError, match="no valid self-signature"):
        parse_key_document(json.dumps(forged).encode(), frozenset({NAME}), None, 0.0)


def test_a_tampered_document_fails_its_signature() -> None:
    key = SigningKey(NAME)
    doc = key.key_document()
    doc["valid_until_ts"] += 1
    with pytest.raises(KeyDocumentError, match="no valid self-signature"):
        parse_key_document(json.dumps(doc).encode(), frozenset({NAME}), None, 0.0)


@pytest.mark.parametrize("body", [b"", b"[]", b"{", b'{"server_name": 5}', b"\xff"])
def test_garbage_is_a_key_document_error(body: bytes) -> None:
    with pytest.raises(KeyDocumentError):
        parse_key_document(body, frozenset({NAME}), None, 0.0)


def test_identity_survives_a_proper_rotation_but_not_a_new_owner() -> None:
    alive = KeyRecord(NAME, (("ed25519:a", "AAAA"),), (), 0.0)
    rotated = KeyRecord(NAME, (("ed25519:b", "BBBB"),), (("ed25519:a", "AAAA"),), 1.0)
    reborn = KeyRecord(NAME, (("ed25519:a", "CCCC"),), (), 1.0)  # same id, other key
    assert alive.same_identity(alive)
    assert alive.same_identity(rotated)
    assert not alive.same_identity(reborn)


def test_the_key_book_survives_a_restart_and_sets_a_broken_file_aside(tmp_path: Path) -> None:
    path = tmp_path / "signing-keys.json"
    book = KeyBook(path)
    book.record(KeyRecord(NAME, (("ed25519:a", "AAAA"),), (), 5.0, (NAME, 8448)))
    delegated = KeyRecord("d.example.org", (("ed25519:b", "BBBB"),), (), 5.0, ("h", 8443), "h")
    book.record(delegated)
    book.add_resurrection(Resurrection("held.example.org", "true", "new keys", 6.0, held=True))
    book.flush()
    again = KeyBook(path)
    again.load()
    assert again.records[NAME].target == (NAME, 8448)
    assert again.records[NAME].keys == (("ed25519:a", "AAAA"),)
    assert again.records[NAME].sni is None
    assert again.records["d.example.org"] == delegated  # with the delegated host's SNI
    assert again.held == {"held.example.org"}
    assert again.release("held.example.org") and not again.release("held.example.org")

    path.write_text("{not json")
    broken = KeyBook(path)
    broken.load()
    assert broken.records == {} and not path.exists()
    assert len(list(tmp_path.glob("signing-keys.broken-*"))) == 1
