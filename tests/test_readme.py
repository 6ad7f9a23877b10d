"""The README's option table is the option table in sidecar/options.py, row for row."""

from __future__ import annotations

import re
from pathlib import Path

from sidecar.config.options import OPTIONS, Option

README = Path(__file__).resolve().parents[1] / "README.md"


def table_row(option: Option) -> str:
    flag = (
        f"{option.cli} / --no-{option.cli[2:]}" if option.flag else f"{option.cli} {option.metavar}"
    )
    if option.flag:
        default = "on" if option.default else "off"
    elif option.repeatable or not option.default:
        default = ""
    else:
        default = f"`{option.default}`"
    return f"| `{flag}` | `{option.env}` | {default} | {option.help} |".replace("|  |", "| |")


def test_readme_option_table_matches_the_code() -> None:
    text = README.read_text()
    block = re.search(r"<!-- options-table.*?-->\n(.*?)<!-- /options-table -->", text, re.S)
    assert block, "README.md lost its options-table markers"
    rows = [line for line in block.group(1).splitlines() if line.startswith("| `")]
    expected = [table_row(o) for o in OPTIONS]
    assert rows == expected, "README options table is stale; expected rows:\n" + "\n".join(expected)


def test_readme_names_the_test_command_ci_runs() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    assert "scripts/test" in README.read_text() and "scripts/test" in ci
