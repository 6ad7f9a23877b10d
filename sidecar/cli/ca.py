"""`tombstone-sidecar ca`: make (once) and export the CA that intercept mode signs with."""

from __future__ import annotations

import argparse
from pathlib import Path

from sidecar.cli import exits
from sidecar.cli.args import add_options, fail, sources_note
from sidecar.config.options import RawOptions, Settings

NAME = "ca"
EPILOG = f"""\
{sources_note("TOMBSTONE_STATE_DIR=/var/lib/tombstone-sidecar tombstone-sidecar ca")}
examples:
  tombstone-sidecar ca --export /etc/matrix/tombstone-ca.pem
  tombstone-sidecar ca --bundle /etc/matrix/federation-ca-bundle.pem
"""


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    parser: argparse.ArgumentParser = commands.add_parser(
        NAME,
        help="create (once) and export the intercept-mode CA",
        description="The CA intercept mode signs its certificates with lives in <state-dir>/ca\n"
        "and is made on first use. Export it for the homeserver: federation_custom_ca_list\n"
        "(it replaces the system store for federation, so give it the --bundle) or\n"
        "SSL_CERT_FILE.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--export", metavar="FILE", help="write the CA certificate (PEM)")
    parser.add_argument("--bundle", metavar="FILE", help="write system CAs + ours (PEM)")
    add_options(parser, NAME)
    return parser


def main(args: argparse.Namespace, settings: Settings, raw: RawOptions) -> int:
    from sidecar.proxy import ca

    try:
        cert = ca.ensure_ca(settings.state_dir)
        if args.export:
            ca.export(cert, Path(args.export))
        if args.bundle:
            ca.write_bundle(cert, Path(args.bundle))
    except OSError as e:
        return fail(str(e))
    print(f"CA {cert}: {ca.describe(cert)}")
    for what, path in (("certificate", args.export), ("bundle", args.bundle)):
        if path:
            print(f"wrote the {what} to {path}")
    return exits.OK
