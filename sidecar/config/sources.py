"""Where raw option values come from: flags, `TOMBSTONE_*` variables and the YAML file.

`gather_raw` merges them for one subcommand (flag > env > file > default) and remembers
where each value came from, so that `Settings.from_raw` can name the flag, the variable or
the file and line of a bad value. A name that is no option is an error wherever it appears
(a YAML key, a `TOMBSTONE_*` variable): a typo must not silently do nothing.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from sidecar.config.options import (
    BY_NAME,
    ENV,
    ENV_PREFIX,
    FLAG,
    OPTIONS,
    ConfigError,
    RawOptions,
    Source,
    options_for,
)

CONFIG = BY_NAME["config"]
# How alike a misspelt name must be to an option's to be offered as "did you mean"
# (difflib's ratio over the names without prefix): min_tll → min_ttl is 0.86, max_ttl only 0.71.
CLOSE_MATCH = 0.75


class ConfigFile(dict[str, Any]):
    """A YAML config file's values by option name, and the line each key is on."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.lines: dict[str, int | None] = {}
        self.written: dict[str, str] = {}  # each key as written: `min-ttl` or `min_ttl`

    def source(self, name: str) -> Source:
        return Source("file", self.path, self.lines.get(name), self.written.get(name, name))


def load_config_file(path: str, where: str = CONFIG.cli) -> ConfigFile:
    """Read the YAML config; unknown keys are errors (a typo must not silently do nothing).

    `where` is how the file was named (`--config` or `TOMBSTONE_CONFIG`); every error starts
    with it, and one about a key says the file's line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("config", f"cannot read {path}: {e.strerror or e}", where) from None
    except UnicodeDecodeError as e:
        raise ConfigError("config", f"{path} is not UTF-8 text: {e}", where) from None
    try:
        node, data = _parse_yaml(text)
    except (ValueError, KeyError, AttributeError, TypeError, RecursionError) as e:
        # PyYAML's constructors raise these for values like `!!int abc` or `2001-02-30`.
        problem = f"{path} is not valid YAML: {str(e)[:200]}"
        raise ConfigError("config", problem, where) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        problem = f"{path}{at} is not valid YAML: {getattr(e, 'problem', e)}"
        raise ConfigError("config", problem, where) from None
    config = ConfigFile(path)
    if data is None:
        return config
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise ConfigError("config", f"{path} must be a mapping of option: value", where)
    # The line of each key as written (a later duplicate wins, as in the mapping itself).
    lines = {
        key.value: key.start_mark.line + 1
        for key, _ in node.value
        if isinstance(key, yaml.ScalarNode)
    }
    for key, value in data.items():
        written = str(key)
        line = lines.get(written)
        at = f"{path} line {line}" if line else path
        name = written.replace("-", "_")
        if name not in BY_NAME or name == CONFIG.name:
            problem = f"{at}: unknown option {key!r}{_did_you_mean(name, 'yaml')}"
            raise ConfigError("config", problem, where)
        if name in config:
            problem = f"{at}: {key!r} is given twice (as - and _ spellings)"
            raise ConfigError("config", problem, where)
        config[name] = value
        config.lines[name] = line
        config.written[name] = written
    return config


def _parse_yaml(text: str) -> tuple[yaml.Node | None, Any]:
    """The document's node tree (for the line of each key) and its value, as safe_load
    reads it."""
    loader = yaml.SafeLoader(text)  # its reader rejects unprintable characters already
    try:
        node = loader.get_single_node()
        return node, loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()


def check_environment(environ: Mapping[str, str]) -> None:
    """A `TOMBSTONE_*` variable that names no option is an error, as an unknown YAML key is:
    the prefix belongs to the sidecar's options, and a misspelt one would do nothing."""
    known = {o.env for o in OPTIONS}
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            hint = _did_you_mean(name.removeprefix(ENV_PREFIX).lower(), "env") or (
                f"; every {ENV_PREFIX}* variable must name an option (see --help)"
            )
            raise ConfigError("", f"unknown option{hint}", name)


def gather_raw(
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    command: str | None = None,
) -> RawOptions:
    """Merge one command's sources: flag > env > config file > default.

    Only the options `command` uses are taken (all of them without one); the others may
    appear in a shared env or file and are left alone. Unknown names are errors."""
    env = os.environ if environ is None else environ
    check_environment(env)
    if flags.get(CONFIG.name):
        from_file = load_config_file(flags[CONFIG.name], CONFIG.cli)
    elif env.get(CONFIG.env):
        from_file = load_config_file(env[CONFIG.env], CONFIG.env)
    else:
        from_file = ConfigFile("")
    raw = RawOptions()
    used = options_for(command) if command is not None else OPTIONS
    for option in used:
        if flags.get(option.name) is not None:
            raw[option.name], raw.sources[option.name] = flags[option.name], FLAG
        elif option.env in env:
            raw[option.name], raw.sources[option.name] = env[option.env], ENV
        elif option.name in from_file:
            raw[option.name] = from_file[option.name]
            raw.sources[option.name] = from_file.source(option.name)
    return raw


def _did_you_mean(name: str, spelling: str) -> str:
    """` (did you mean min_ttl?)`, the option spelled as `yaml` or `env`; "" if none is close."""
    names = [o.name for o in OPTIONS if o is not CONFIG or spelling == "env"]
    close = difflib.get_close_matches(name, names, n=2, cutoff=CLOSE_MATCH)
    spelled = [getattr(BY_NAME[c], spelling) for c in close]
    return f" (did you mean {' or '.join(spelled)}?)" if spelled else ""
