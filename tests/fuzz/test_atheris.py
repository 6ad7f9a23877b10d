"""The atheris harness (tests/fuzz/atheris_harness.py) works, when atheris is installed.

"ci": every target takes a few seed inputs in-process, and one target runs briefly under
libFuzzer to prove the harness boots. "deep": every target runs under libFuzzer for half a
minute (for longer runs, call the harness directly: see its docstring).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz import profiles
from tests.fuzz.atheris_harness import TARGETS, make_target

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None, reason="atheris is not installed"
)
REPO = Path(__file__).resolve().parents[2]
SEEDS: list[bytes | str] = [
    b"",
    b"example.org:8448",
    b"[::1]:443",
    b"v=matrix;gone",
    b"min_ttl: 5m\nmax_ttl: 1h\n",
    b'{"destination": "a.example", "state": "alive", "observed_at": 1, "expires_at": 2}',
    b"Basic c3luYXBzZTpzM2NyZXQtcGFzcw==",
    # Inputs that found bugs (fixed since): the targets must take them now.
    "1:" + "a" * 3000,
    b"min_ttl: !!timestamp foo\n",
    b'{"destination": "a", "state": "alive", "observed_at": 1' + b"0" * 400 + b', "expires_at": 1}',
    b"Basic " + b"bm9ib2R5OnDDpHNzd29yZA==",
    b"[" * 10_000,  # a state-file row that stopped start-up with RecursionError (issue 14)
]


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_takes_its_seeds(target: str) -> None:
    one_input = make_target(target, instrument=False)
    for seed in SEEDS:
        one_input(seed.encode() if isinstance(seed, str) else seed)


def libfuzzer(target: str, *flags: str, timeout: float) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tests.fuzz.atheris_harness", target, *flags]
    return subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_the_harness_boots_under_libfuzzer(tmp_path: Path) -> None:
    result = libfuzzer(
        "names", "-runs=2000", "-seed=1", f"-artifact_prefix={tmp_path}/", timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 2000 runs" in result.stderr


@pytest.mark.skipif(profiles.active() != profiles.DEEP, reason="deep profile only")
@pytest.mark.parametrize("target", TARGETS)
def test_target_under_libfuzzer_for_half_a_minute(target: str, tmp_path: Path) -> None:
    result = libfuzzer(
        target,
        "-max_total_time=30",
        "-timeout=10",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={tmp_path}/",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-5000:]
