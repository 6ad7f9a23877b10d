"""Choosing a store from `--store`: the one place that knows every backend."""

from __future__ import annotations

from pathlib import Path

from sidecar.metrics import Metrics
from sidecar.store.base import VerdictStore, default_state_dir


def open_store(spec: str, state_dir: str, metrics: Metrics) -> VerdictStore:
    """`memory`, `sqlite` (a file in `state_dir`) or `redis://host:port/db`."""
    if spec == "memory":
        return VerdictStore(metrics)
    if spec == "sqlite":
        from sidecar.store.sqlite import SqliteStore

        return SqliteStore(Path(state_dir or default_state_dir()), metrics)
    from sidecar.store.redis import RedisStore

    return RedisStore(spec, metrics)
