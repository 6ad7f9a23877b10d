"""Hypothesis profiles: "ci" (the default, bounded) and "deep" (on demand, long).

Select with the environment: `HYPOTHESIS_PROFILE=deep python -m pytest tests/fuzz`.
Tests that do real I/O (UDP, TCP, processes) take their example count from `examples()`,
so both profiles scale them too.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

PROFILE_ENV = "HYPOTHESIS_PROFILE"
CI, DEEP = "ci", "deep"

# Hypothesis keeps failing examples (replayed first on the next run) and caches in its home
# directory. Put it under .pytest_cache, which git ignores, not in a new top-level
# .hypothesis that pytest's `norecursedirs` would then warn about on every run.
HOME = Path(__file__).resolve().parents[2] / ".pytest_cache" / "hypothesis"


def active() -> str:
    """The profile this run uses: HYPOTHESIS_PROFILE, or "ci"."""
    name = os.environ.get(PROFILE_ENV, CI).strip() or CI
    if name not in (CI, DEEP):
        raise ValueError(f"{PROFILE_ENV}={name!r}: expected {CI!r} or {DEEP!r}")
    return name


def register() -> str:
    """Register both profiles and load the active one; returns its name."""
    set_hypothesis_home_dir(str(HOME))
    base = settings(
        print_blob=True,  # a failure prints @reproduce_failure(...) to replay it exactly
        # A pure parser taking over a second on one input is a finding (a hang in the making).
        deadline=timedelta(seconds=1),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile(CI, base, max_examples=100)
    settings.register_profile(DEEP, base, max_examples=1500)
    name = active()
    settings.load_profile(name)
    return name


def examples(ci: int, deep: int) -> int:
    """Example count for a test doing real I/O, by profile."""
    return deep if active() == DEEP else ci
