"""`tombstone-sidecar tombstone NAME`: print what a retiring homeserver must publish.

The rendering lives in `kit`; this is the command line around it: options, the one-line
errors, and where each part goes (stdout: the kit; stderr: notes about adjusted values,
so `--only nginx > tombstone.conf` stays a clean file).
"""

from __future__ import annotations

import argparse
import json
import sys

from sidecar.cli import exits
from sidecar.cli.args import fail
from sidecar.config.options import RawOptions, Settings
from sidecar.config.values import parse_duration
from sidecar.kit import tombstone as kit

NAME = "tombstone"

DESCRIPTION = """\
Print everything a homeserver that is shutting down should publish so that other servers
stop contacting it: a DNS TXT record "v=matrix;gone" (optionally an SRV record with the
target "."), and nginx and Caddy snippets that answer 410 Gone on /_matrix/ and
/.well-known/matrix/ with a Matrix error JSON body and Cache-Control: max-age (MSC4188).
Nothing is changed anywhere: paste the parts, then confirm with `check NAME --probe`.
"""

EPILOG = """\
what senders do with it:
  TXT v=matrix;gone   a homeserver behind tombstone-sidecar stops before connecting
  SRV target "."      RFC 2782 "not available"; Synapse 1.163 mis-reads it and cannot
                      connect at all, so your 410 on the federation port goes unseen
  410 + max-age       the sidecar (and MSC4188 resolvers) stay away for max-age; plain
                      Synapse treats a 410 as an answer, not a failure, so keep DNS too

examples:
  tombstone-sidecar tombstone example.org --date 2026-12-01 \\
      --contact admin@example.org --successor new.example.org
  tombstone-sidecar tombstone example.org --only nginx > /etc/nginx/snippets/tombstone.conf
  tombstone-sidecar tombstone example.org --federation-host matrix.example.org --srv
  tombstone-sidecar tombstone example.org --format json
"""


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Add `tombstone` below the top-level subcommands; returns its parser. It reads no
    option from the table (nor the environment): only its own arguments."""
    parser: argparse.ArgumentParser = commands.add_parser(
        NAME,
        help="print the DNS records and nginx/Caddy 410 snippets that retire a server",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", metavar="NAME", help="your server name, e.g. example.org")
    parser.add_argument(
        "--date",
        metavar="YYYY-MM-DD",
        help="day of decommissioning, shown in the error body (default: today, UTC)",
    )
    parser.add_argument(
        "--contact",
        metavar="TEXT",
        default="",
        help="who to ask, e.g. an e-mail or @admin:new.example.org",
    )
    parser.add_argument(
        "--successor", metavar="TEXT", default="", help="where the users went, e.g. new.example.org"
    )
    parser.add_argument(
        "--max-age",
        metavar="DURATION",
        default="30d",
        help="Cache-Control max-age of the 410: how long a sender stays away "
        "before asking again; 1d..30d, clamped (default 30d, MSC4188's "
        "longest)",
    )
    parser.add_argument(
        "--dns-ttl", metavar="DURATION", default="1h", help="TTL of the DNS records (default 1h)"
    )
    parser.add_argument(
        "--federation-host",
        metavar="HOST",
        action="append",
        default=[],
        help="a host your well-known or SRV delegated to (e.g. "
        "matrix.example.org); it gets a TXT record too, because senders "
        "that cached the delegation connect to it directly (repeatable)",
    )
    parser.add_argument(
        "--srv",
        action="store_true",
        help='also publish _matrix-fed._tcp.NAME SRV 0 0 0 "." (see below)',
    )
    parser.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="text for people (default) or json for tools",
    )
    parser.add_argument(
        "--only", choices=kit.PARTS, help="print just this part, ready to save as a file"
    )
    return parser


def main(args: argparse.Namespace, settings: Settings, raw: RawOptions) -> int:
    try:
        max_age = _duration("--max-age", args.max_age)
        dns_ttl = _duration("--dns-ttl", args.dns_ttl)
        tombstone = kit.make(
            args.name,
            date=args.date,
            contact=args.contact,
            successor=args.successor,
            max_age=max_age,
            dns_ttl=dns_ttl,
            srv=args.srv,
            federation_hosts=args.federation_host,
        )
    except kit.KitError as e:
        return fail(str(e))
    for note in tombstone.notes:
        print(f"tombstone-sidecar: note: {note}", file=sys.stderr)
    if args.format == "json":
        data = kit.as_dict(tombstone)
        key = {"dns": "dns_records"}.get(args.only, args.only)
        print(json.dumps(data[key] if key else data, indent=2))
    elif args.only:
        sys.stdout.write(kit.RENDER[args.only](tombstone))
    else:
        sys.stdout.write(kit.render_text(tombstone))
    return exits.OK


def _duration(option: str, text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise kit.KitError(f"{option}: {e}") from None
