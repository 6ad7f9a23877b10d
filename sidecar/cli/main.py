"""`tombstone-sidecar`: the parser tree and the dispatch to one module per subcommand.

Each subcommand module has `NAME`, `add_parser` (its arguments, plus the table options it
uses) and `main(args, settings, raw)`. Here, only the options that subcommand uses are read
from flags, `TOMBSTONE_*` variables and the config file, and validated; a bad one is one
line on stderr naming where it came from, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Protocol

from sidecar import __version__
from sidecar.cli import ca, check, kit, run, verdicts
from sidecar.cli.args import PROG, Parser, fail
from sidecar.config.options import ConfigError, RawOptions, Settings, options_for
from sidecar.config.sources import gather_raw


class Subcommand(Protocol):
    NAME: str

    def add_parser(self, commands: argparse._SubParsersAction) -> argparse.ArgumentParser: ...  # type: ignore[type-arg]

    def main(self, args: argparse.Namespace, settings: Settings, raw: RawOptions) -> int: ...


SUBCOMMANDS: tuple[Subcommand, ...] = (run, check, verdicts, ca, kit)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description=run.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )
    for subcommand in SUBCOMMANDS:
        subcommand.add_parser(commands).set_defaults(subcommand=subcommand)
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run one subcommand; `environ` (default: the process's) is where TOMBSTONE_* come from."""
    args = build_parser().parse_args(argv)
    subcommand: Subcommand = args.subcommand
    used = options_for(subcommand.NAME)
    try:
        raw = RawOptions()
        if used:  # a subcommand without table options reads no environment or file at all
            flags = {o.name: getattr(args, o.name, None) for o in used}
            raw = gather_raw(flags, environ, subcommand.NAME)
        settings = Settings.from_raw(raw, subcommand.NAME)
    except ConfigError as e:
        return fail(str(e))
    return subcommand.main(args, settings, raw)


if __name__ == "__main__":
    sys.exit(main())
