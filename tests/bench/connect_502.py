"""Baseline addon for `mitmdump -s`: answer every CONNECT with a 502 and `Connection: close`.

This is the ceiling a suppressing addon runs under: mitmproxy parses the CONNECT, an addon
sets `flow.response`, mitmproxy writes it and closes. The body has the size and shape of
the sidecar's own answer, so both sides send the same number of bytes.
"""

from __future__ import annotations

from mitmproxy import http

BODY = (
    b'{"errcode": "M_SERVER_DECOMMISSIONED", "error": "gone.example is decommissioned '
    b'(operator: on the operator deny list)", "signal": "operator"}'
)
HEADERS = {"Content-Type": "application/json", "Connection": "close"}


class Answer502:
    """Answers CONNECT locally; nothing is ever dialled."""

    def http_connect(self, flow: http.HTTPFlow) -> None:
        flow.response = http.Response.make(502, BODY, HEADERS)


addons = [Answer502()]
