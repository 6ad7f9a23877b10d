"""Unit tests: pure parsers and small pieces, no processes (a loopback socket at most).

Laid out like the package: tests/unit/judge/test_names.py tests sidecar/judge/names.py.
Time-driven parts are driven through their `clock=` seam (tests/unit/clock.py): no sleeps.
"""
