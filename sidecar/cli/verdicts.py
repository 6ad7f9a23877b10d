"""`tombstone-sidecar verdicts list|show|forget|deny`: the ops API, for a person at a terminal.

It talks to a running sidecar's ops listener (`--ops-listen`, the same option the sidecar
reads, so a shared config file or env points both at one place) and prints tables; every
command takes `--json` for scripts. Changes send the token from `--ops-token-file`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from sidecar.cli import exits
from sidecar.cli.args import add_options, fail, sources_note
from sidecar.config.options import RawOptions, Settings

NAME = "verdicts"
REQUEST_TIMEOUT_SECONDS = 30.0  # a DELETE waits for a fresh DNS check
EVIDENCE_WIDTH = 60


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


EXITS = (
    f"exit status: {exits.OK} done, {exits.NOT_FOUND} no verdict for that name, "
    f"{exits.USAGE} usage error,\n{exits.NO_ANSWER} the sidecar did not answer "
    "(or refused the request)."
)
EPILOG = f"""\
{EXITS}

options: see `verdicts ACTION --help`.
{sources_note("TOMBSTONE_OPS_LISTEN=127.0.0.1:9480 tombstone-sidecar verdicts list")}
examples:
  tombstone-sidecar verdicts list --state gone
  tombstone-sidecar verdicts show old.example.org
  tombstone-sidecar verdicts deny old.example.org --ttl 30d --comment "shut down 2026-11"
  tombstone-sidecar verdicts forget old.example.org      # check it again now
"""


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Add `verdicts` and its actions list/show/forget/deny, each with the options."""
    verdicts: argparse.ArgumentParser = commands.add_parser(
        NAME,
        help="list, show, forget or mark verdicts of a running sidecar",
        description="Talk to a running sidecar's ops API (--ops-listen). Changes (forget,\n"
        "deny) need the token from --ops-token-file.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = verdicts.add_subparsers(dest="verdicts_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="list cached verdicts")
    listing.add_argument("--state", choices=["gone", "unreachable", "alive", "undecided"])
    listing.add_argument("--signal", help="e.g. dns_txt_gone, nxdomain, operator")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    listing.add_argument("--offset", type=int, default=0)
    listing.add_argument(
        "--sort",
        choices=["name", "suppressed"],
        default="name",
        help="order: by server name (default), or `suppressed`: the dead servers this "
        "homeserver tries hardest to reach first",
    )
    listing.add_argument(
        "--synapse",
        action="store_true",
        help="join Synapse's view of each destination (backoff, failing since, shared rooms) "
        "from its admin API (--synapse-admin-url, --synapse-admin-token-file)",
    )
    show = actions.add_parser("show", help="one verdict with its evidence")
    forget = actions.add_parser("forget", help="forget a verdict and check the name again now")
    deny = actions.add_parser("deny", help="mark a server gone (signal operator)")
    deny.add_argument("--ttl", default=None, help="how long, e.g. 30d (default: until forgotten)")
    deny.add_argument("--comment", default="", help="why, for the evidence field")
    for parser in (show, forget, deny):
        parser.add_argument("name", metavar="NAME", help="server name")
    for parser in (listing, show, forget, deny):
        parser.add_argument("--json", action="store_true", help="print JSON")
        add_options(parser, NAME)
    return verdicts


def main(args: argparse.Namespace, settings: Settings, raw: RawOptions) -> int:
    if settings.ops_listen is None:
        return fail(f"{raw.label('ops_listen')} is empty; nothing to talk to")
    client = OpsClient(f"http://{settings.ops_listen}", settings.ops_token)
    try:
        if args.verdicts_command == "list":
            query = {
                "limit": args.limit,
                "offset": args.offset,
                "state": args.state,
                "signal": args.signal,
                "sort": args.sort,
            }
            result = client.call("GET", "/v1/verdicts", query=query)
            if getattr(args, "synapse", False):
                return _list_with_synapse(result, settings, args.json)
            print(json.dumps(result, indent=2) if args.json else _table(result))
            return exits.OK
        path = "/v1/verdicts/" + urllib.parse.quote(args.name, safe="")
        if args.verdicts_command == "show":
            result = client.call("GET", path)
        elif args.verdicts_command == "forget":
            result = client.call("DELETE", path)
        else:
            body = {"comment": args.comment, **({"ttl": args.ttl} if args.ttl else {})}
            result = client.call("PUT", path, body=body)
        print(json.dumps(result, indent=2) if args.json else _details(result))
        return exits.OK
    except ApiError as e:
        print(f"tombstone-sidecar: {e}{_hint(e, settings)}", file=sys.stderr)
        return exits.NOT_FOUND if e.status == 404 else exits.NO_ANSWER


def _hint(error: ApiError, settings: Settings) -> str:
    """What to do about a 401: the token comes from --ops-token-file, as the sidecar's does."""
    if error.status != 401:
        return ""
    if settings.ops_token is None:
        return (
            "\nchanges need the sidecar's bearer token: pass --ops-token-file FILE "
            "(or TOMBSTONE_OPS_TOKEN_FILE), the same file the sidecar was started with"
        )
    return (
        "\nthe token in --ops-token-file is not the one the sidecar reads: point it at "
        "the file the sidecar was started with"
    )


class OpsClient:
    def __init__(self, base: str, token: str | None) -> None:
        self.base = base
        self.token = token

    def call(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        url = self.base + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token and method != "GET":
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_SECONDS) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise ApiError(e.code, f"{method} {path}: {e.code} {_error_text(e)}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ApiError(
                0,
                f"cannot reach the sidecar at {self.base}: {reason} "
                "(is it running? is --ops-listen right?)",
            ) from None
        if not isinstance(payload, dict):
            raise ApiError(0, f"{method} {path}: unexpected answer")
        return payload


def _error_text(error: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(error.read()).get("error", error.reason))
    except (ValueError, AttributeError):
        return str(error.reason)


def _expires(expires_at: float) -> str:
    left = expires_at - time.time()
    if left <= 0:
        return "expired"
    for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
        if left >= seconds:
            return f"{left / seconds:.0f}{unit}"
    return f"{left:.0f}s"


def _table(result: dict[str, Any]) -> str:
    rows = [("DESTINATION", "STATE", "SIGNAL", "EXPIRES", "SUPPRESSED", "EVIDENCE")]
    for v in result.get("verdicts", []):
        evidence = str(v.get("evidence", ""))
        if len(evidence) > EVIDENCE_WIDTH:
            evidence = evidence[: EVIDENCE_WIDTH - 1] + "…"
        suppressed = str(v.get("suppressed_count", 0))
        expires = _expires(v["expires_at"])
        rows.append(
            (v["destination"], v["state"], v.get("signal") or "-", expires, suppressed, evidence)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in rows
    ]
    shown = len(rows) - 1
    total = result.get("total", shown)
    if total > shown:
        lines.append(f"({shown} of {total}; use --offset/--limit for more)")
    return "\n".join(lines)


def _list_with_synapse(result: dict[str, Any], settings: Settings, as_json: bool) -> int:
    from sidecar.synapse import view as synapse_view

    if not settings.synapse_admin_url or not settings.synapse_admin_token:
        return fail("--synapse needs --synapse-admin-url and --synapse-admin-token-file")
    joined = synapse_view.join(result, settings.synapse_admin_url, settings.synapse_admin_token)
    print(json.dumps(joined, indent=2) if as_json else synapse_view.table(joined))
    return exits.OK


def _details(v: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["observed_at"]))
    until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["expires_at"]))
    return "\n".join(
        [
            f"destination:  {v['destination']}",
            f"state:        {v['state']}",
            f"signal:       {v.get('signal') or '-'}",
            f"evidence:     {v.get('evidence', '')}",
            f"observed:     {when}",
            f"expires:      {until} (in {_expires(v['expires_at'])})",
            f"suppressed:   {v.get('suppressed_count', 0)} since this process started",
        ]
    )
