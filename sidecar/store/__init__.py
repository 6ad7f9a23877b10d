"""Where verdicts outlive the process: the contract (base), memory, SQLite, Redis, and
`open.py`, the one place that picks a backend from `--store`."""
