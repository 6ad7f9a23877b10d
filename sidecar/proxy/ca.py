"""The sidecar's own CA for intercept mode: made once per deployment, never shipped.

mitmproxy keeps its CA in its confdir; in intercept mode that is `<state-dir>/ca`, so the
CA is generated on first start (or by `tombstone-sidecar ca`) and survives restarts with
the state volume. The homeserver must trust it: `federation_custom_ca_list` (which
replaces the system store for federation, so use the bundle) or `SSL_CERT_FILE`.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import socket
import ssl
from pathlib import Path

import certifi
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sidecar.store.base import default_state_dir

CA_DIR = "ca"
BASENAME = "mitmproxy"  # mitmproxy's file names: mitmproxy-ca.pem, mitmproxy-ca-cert.pem
KEY_SIZE = 2048
TRUST_FILE = "upstream-trust.pem"


def ca_dir(state_dir: str) -> Path:
    return Path(state_dir or default_state_dir()) / CA_DIR


def ensure_ca(state_dir: str) -> Path:
    """Create the CA if it does not exist yet; return its certificate (PEM, no key)."""
    from mitmproxy.certs import CertStore

    directory = ca_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert = directory / f"{BASENAME}-ca-cert.pem"
    if not (directory / f"{BASENAME}-ca.pem").exists():
        # Named for what it is, and unique per deployment, so an operator who finds it in a
        # trust store knows where it came from.
        name = f"tombstone-sidecar CA {socket.gethostname()[:32]} {secrets.token_hex(4)}"
        CertStore.create_store(directory, BASENAME, KEY_SIZE, "tombstone-sidecar", name)
    CertStore.from_store(directory, BASENAME, KEY_SIZE)
    return cert


def describe(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    pairs = ":".join(digest[i : i + 2] for i in range(0, len(digest), 2)).upper()
    return (
        f"{cert.subject.rfc4514_string()}, valid until "
        f"{cert.not_valid_after_utc:%Y-%m-%d}, SHA-256 {pairs}"
    )


def write_bundle(cert_path: Path, destination: Path) -> None:
    """System CAs (certifi) plus ours: one file for SSL_CERT_FILE or federation_custom_ca_list."""
    system = Path(certifi.where()).read_text()
    _write(destination, system.rstrip("\n") + "\n" + cert_path.read_text())


def export(cert_path: Path, destination: Path) -> None:
    shutil.copyfile(cert_path, destination)


def upstream_trust(state_dir: str, extra_ca: str) -> str:
    """System CAs plus --upstream-ca, for mitmproxy's upstream verification (which would
    otherwise use only one of them)."""
    directory = ca_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ssl.create_default_context().load_verify_locations(extra_ca)  # fails early if bad
    path = directory / TRUST_FILE
    text = Path(certifi.where()).read_text().rstrip("\n") + "\n" + Path(extra_ca).read_text()
    _write(path, text)
    return str(path)


def _write(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
