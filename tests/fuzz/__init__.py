"""Property-based fuzz tests (hypothesis) for every parser that takes outside input.

`python -m pytest tests/fuzz` runs the bounded "ci" profile; `HYPOTHESIS_PROFILE=deep`
runs the same properties with many more examples. `python -m tests.fuzz.atheris_harness`
drives the pure parsers with atheris (libFuzzer) on demand.
"""
