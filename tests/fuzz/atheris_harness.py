"""Coverage-guided fuzzing of the pure parsers with atheris (libFuzzer), on demand.

    python -m tests.fuzz.atheris_harness TARGET [libFuzzer flags]
    python -m tests.fuzz.atheris_harness names -max_total_time=300
    python -m tests.fuzz.atheris_harness config -runs=100000 corpus_dir/

TARGET is one of: names, tombstone, options, config, verdicts, proxy_auth (or `all` with
-runs/-max_total_time, one after another in subprocesses). Each target checks the same
properties as the hypothesis tests next to it; a violated one raises and libFuzzer saves
the input as crash-<sha1> (replay it: `python -m tests.fuzz.atheris_harness TARGET FILE`).

atheris is not a project dependency (`pip install atheris`; it ships wheels for CPython
3.11 on x86-64 Linux). tests/fuzz/test_atheris.py runs each target briefly when it is
installed.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from tests.fuzz.strategies import MAX_NAME_MESSAGE

TARGETS = ("names", "tombstone", "options", "config", "verdicts", "proxy_auth")
USERS = {"synapse": "s3cret-pass", "üser": "pässwörd"}


def make_target(name: str, instrument: bool = True) -> Callable[[bytes], None]:
    """Import the code under test (instrumented for coverage, unless it is imported
    already or `instrument` is false) and return the target's one-input function."""
    atheris: Any = importlib.import_module("atheris")
    hook = atheris.instrument_imports(include=["sidecar", "yaml"]) if instrument else None
    with hook or contextlib.nullcontext():
        import yaml  # noqa: F401  (instrumented too: config goes through it)

        from sidecar.config import options, sources, values
        from sidecar.judge import names, tombstone_txt, verdicts
        from sidecar.proxy import auth as proxy_auth

    def text(data: bytes) -> str:
        return str(atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(len(data)))

    def fuzz_names(data: bytes) -> None:
        raw = text(data)
        try:
            host = names.normalize_host(raw)
        except names.InvalidName as e:
            assert str(e).strip() and len(str(e)) <= MAX_NAME_MESSAGE, len(str(e))
        else:
            assert len(host) <= names.MAX_NAME_LENGTH and host.isascii()
            assert host == host.lower() and names.normalize_host(host) == host
        try:
            authority = names.parse_authority(raw)
        except names.InvalidName as e:
            assert str(e).strip()
        else:
            assert 1 <= authority.port <= 65535
            assert names.parse_authority(str(authority)) == authority

    def fuzz_tombstone(data: bytes) -> None:
        cut = data[0] % (len(data) + 1) if data else 0
        joined = tombstone_txt.join_strings([data[:cut], data[cut:]])
        assert isinstance(tombstone_txt.is_tombstone(joined), bool)
        if "matrix" not in joined.lower():
            assert not tombstone_txt.is_tombstone(joined)
        found = tombstone_txt.find_tombstone([joined, text(data)])
        assert found is None or tombstone_txt.is_tombstone(found)

    def fuzz_options(data: bytes) -> None:
        raw = text(data)
        try:
            seconds = values.parse_duration(raw)
        except ValueError as e:
            assert str(e).strip()
        else:
            assert seconds > 0 and math.isfinite(seconds)
        parsers: tuple[Callable[[str], object], ...] = (
            values.parse_listen,
            values.parse_nameserver,
            values.parse_share,
            values.parse_bool,
            values.parse_store,
            lambda v: values.parse_int(v, 1, 1000),
        )
        for parse in parsers:
            try:
                parse(raw)
            except ValueError as e:
                assert str(e).strip()

    def fuzz_config(data: bytes) -> None:
        # A directory per input, removed at once: libFuzzer ends the process without
        # running atexit handlers, so one kept for the whole run would be left behind.
        with tempfile.TemporaryDirectory(prefix="atheris-config-") as config_dir:
            fuzz_config_in(data, config_dir)

    def fuzz_config_in(data: bytes, config_dir: str) -> None:
        config_path = os.path.join(config_dir, "config.yaml")
        with open(config_path, "wb") as file:
            file.write(data)
        try:
            raw = sources.load_config_file(config_path)
        except options.ConfigError as e:
            assert str(e).startswith("--config: ")
            return
        cwd = os.getcwd()
        os.chdir(config_dir)
        try:
            options.Settings.from_raw(raw)
        except options.ConfigError as e:
            assert str(e).startswith("--")
        finally:
            os.chdir(cwd)

    def fuzz_verdicts(data: bytes) -> None:
        # Raw bytes, as a state-file row or a Redis value arrives: size, nesting and
        # JSON errors are the store boundary's job too (decode_record), not the caller's.
        try:
            verdict = verdicts.decode_record(data)
        except ValueError as e:
            assert str(e).strip()
        else:
            assert verdicts.from_record(verdicts.to_record(verdict)) == verdict

    auth = proxy_auth.ProxyAuth(USERS)

    def fuzz_proxy_auth(data: bytes) -> None:
        for header in (text(data), "Basic " + base64.b64encode(data).decode()):
            assert auth.check(header) in (True, False)

    return {
        "names": fuzz_names,
        "tombstone": fuzz_tombstone,
        "options": fuzz_options,
        "config": fuzz_config,
        "verdicts": fuzz_verdicts,
        "proxy_auth": fuzz_proxy_auth,
    }[name]


def main(argv: list[str]) -> int:
    args = argv[1:]
    if not args or args[0] not in (*TARGETS, "all"):
        print(__doc__, file=sys.stderr)
        return 2
    name, flags = args[0], args[1:]
    if name == "all":
        failed = 0
        for target in TARGETS:
            command = [sys.executable, "-m", "tests.fuzz.atheris_harness", target, *flags]
            failed |= subprocess.run(command, check=False).returncode != 0
        return int(failed)
    one_input = make_target(name)
    atheris: Any = importlib.import_module("atheris")
    atheris.Setup([argv[0], *flags], one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
