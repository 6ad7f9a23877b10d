"""argparse flags derived from the option table, and the parser every subcommand uses."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from sidecar.cli import exits
from sidecar.config.options import ENV_PREFIX, Option, options_for

PROG = "tombstone-sidecar"


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line naming the problem, and where help is; exit status 2."""
        self.exit(exits.USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def fail(message: str) -> int:
    """Print the one-line error every subcommand prints; returns the usage status."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return exits.USAGE


def sources_note(example: str) -> str:
    """The epilog paragraph on where else options come from; `example` is an env setting
    of one of the subcommand's own options (`TOMBSTONE_MIN_TTL=10m`)."""
    return f"""\
every configuration option can also come from the environment as {ENV_PREFIX}<OPTION>
(lists comma-separated) or from a YAML file (--config; keys as in `min_ttl: 10m`);
precedence is flag > env > file > default. A {ENV_PREFIX}* variable or a file key that
names no option is an error. For example:
  {example}
"""


def _escape(text: str) -> str:
    return text.replace("%", "%%")  # argparse %-formats help text


def add_option(parser: argparse._ActionsContainer, option: Option) -> None:
    """One table option as a flag; its help says the default and the env variable."""
    env = f"env {option.env}"
    if option.flag:
        default = "on" if option.default else "off"
        parser.add_argument(
            option.cli,
            dest=option.name,
            action=argparse.BooleanOptionalAction,
            default=None,
            help=_escape(f"{option.help} (default: {default}; {env})"),
        )
        return
    shown = ", ".join(option.default) if option.repeatable else option.default
    default = f"default: {shown}; " if shown else ""
    parser.add_argument(
        option.cli,
        dest=option.name,
        metavar=option.metavar,
        default=None,
        action="append" if option.repeatable else "store",
        help=_escape(f"{option.help} ({default}{env})"),
    )


CONFIGURATION = "configuration (flag > TOMBSTONE_* variable > --config file > default)"


def add_options(parser: argparse.ArgumentParser, command: str) -> None:
    """Every table option `command` uses, in table order, and no other, in a group of their
    own: these are configuration, the subcommand's other arguments are per invocation."""
    group = parser.add_argument_group(CONFIGURATION)
    for option in options_for(command):
        add_option(group, option)
