"""The answers the sidecar gives instead of forwarding (docs/design.md §7).

Every local answer carries a Matrix-style JSON error body, `Connection: close` (a CONNECT
answer left open would keep the client's socket waiting), and for a tombstone the header
`X-Tombstone-Signal` so a person reading a proxy log or a packet capture sees why.
"""

from __future__ import annotations

import json
import time

from mitmproxy import http

from sidecar.judge.ports import FoundAddresses
from sidecar.judge.verdicts import Verdict
from sidecar.proxy.auth import CHALLENGE

ERRCODE_GONE = "M_SERVER_DECOMMISSIONED"  # not in the spec: names the reason for people and logs
ERRCODE_FORBIDDEN = "M_FORBIDDEN"
ERRCODE_BAD_REQUEST = "M_INVALID_PARAM"  # a malformed target: a parameter, not a JSON body
ERRCODE_TOO_LARGE = "M_TOO_LARGE"
ERRCODE_UNAVAILABLE = "M_UNKNOWN"
SIGNAL_HEADER = "X-Tombstone-Signal"


def _make(status: int, body: dict[str, str], extra: dict[str, str] | None = None) -> http.Response:
    headers = {"Content-Type": "application/json", "Connection": "close", **(extra or {})}
    return http.Response.make(status, json.dumps(body).encode(), headers)


def gone_message(verdict: Verdict) -> str:
    return f"{verdict.destination} is decommissioned ({verdict.signal}: {verdict.evidence})"


def suppressed(verdict: Verdict, status: int) -> http.Response:
    """Answer for a connection or request to a destination judged gone."""
    signal = str(verdict.signal)
    body = {"errcode": ERRCODE_GONE, "error": gone_message(verdict), "signal": signal}
    return _make(status, body, {SIGNAL_HEADER: signal})


def request_refused(verdict: Verdict, status: int, request_class: str) -> http.Response:
    """Answer to a request inside a tunnel (intercept mode), chosen by its request class.

    The Matrix error reaches the user for user-facing requests (Synapse passes a 4xx's
    errcode and text on); the well-known answer carries the verdict's remaining lifetime
    so that a resolver honouring MSC4188 stops discovery for that long.
    """
    signal = str(verdict.signal)
    body = {"errcode": ERRCODE_GONE, "error": gone_message(verdict), "signal": signal}
    extra = {SIGNAL_HEADER: signal, "X-Tombstone-Class": request_class}
    if request_class == "well_known":
        remaining = max(0, int(verdict.expires_at - time.time()))
        extra["Cache-Control"] = f"max-age={remaining}"
    response = _make(status, body, extra)
    del response.headers["Connection"]  # the tunnel stays open for the next request
    return response


def blocked_message(host: str, refused: list[str]) -> str:
    shown = ", ".join(refused[:4])
    return (
        f"{host} resolves only to blocked addresses ({shown}); "
        "allow a range with --allow-address if this is intended"
    )


def blocked_address(host: str, refused: list[str]) -> http.Response:
    """403 for a target whose every address is in a blocked range: not a tombstone."""
    return _make(403, {"errcode": ERRCODE_FORBIDDEN, "error": blocked_message(host, refused)})


def proxy_auth_required() -> http.Response:
    """407 with the Basic challenge; the client must send Proxy-Authorization."""
    return _make(
        407,
        {"errcode": ERRCODE_FORBIDDEN, "error": "proxy authentication required"},
        {"Proxy-Authenticate": CHALLENGE},
    )


def bad_target(reason: str) -> http.Response:
    return _make(400, {"errcode": ERRCODE_BAD_REQUEST, "error": f"invalid proxy target: {reason}"})


def internal_error(what: str) -> http.Response:
    """502 when deciding failed inside the sidecar: refused, never forwarded unchecked."""
    error = f"tombstone-sidecar could not decide on this {what} (internal error; see its log)"
    return _make(502, {"errcode": ERRCODE_UNAVAILABLE, "error": error})


def nowhere(name: str) -> http.Response:
    """502 for a request inside a `CONNECT :0` tunnel whose server is not gone: the client
    asked for no host (an SRV target "."), so there is nothing to send it to."""
    error = (
        f"no host to send this request for {name} to: the client asked for CONNECT :0 "
        "(an SRV target '.'), and the sidecar never guesses one"
    )
    return _make(502, {"errcode": ERRCODE_UNAVAILABLE, "error": error})


def unresolvable(host: str, detail: str) -> http.Response:
    """502 when the sidecar cannot learn an address to connect to (it never guesses one)."""
    return _make(502, {"errcode": ERRCODE_UNAVAILABLE, "error": f"cannot resolve {host}: {detail}"})


def no_address_reason(host: str, found: FoundAddresses) -> str:
    """Why there is no address to dial for `host`: DNS failed, or said there is none."""
    if not found.known:
        return f"DNS did not answer for {host}: {found.detail}"
    return f"{host} has no A or AAAA records"
