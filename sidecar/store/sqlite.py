"""Verdicts that survive a restart: a SQLite file in `--state-dir`, written behind the cache.

A pod restart must not send a burst of traffic to dead servers, so verdicts are loaded
before the proxy serves. Writes never touch the request path: `save` puts the verdict in
a dict (later saves of one name coalesce) and a writer task flushes batches through one
worker thread, the only thread that touches the connection. A corrupt file is moved
aside and the sidecar starts empty; a row that fails validation is dropped and counted
(`tombstone_store_invalid_records_total`). A read-only file still loads its verdicts; it,
a full disk or an unwritable directory leave the sidecar serving from memory, retrying,
with `tombstone_store_up{store="sqlite"}` at 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

from sidecar.judge.names import MAX_NAME_LENGTH
from sidecar.judge.verdicts import (
    MAX_RECORD_BYTES,
    STALE_GRACE_SECONDS,
    Verdict,
    decode_record,
    to_record,
)
from sidecar.metrics import Metrics
from sidecar.store.base import RemoteForget, RemoteVerdict, WriteBehindStore

log = logging.getLogger("sidecar.store")

FILE_NAME = "verdicts.sqlite3"
FLUSH_DELAY_SECONDS = 0.2  # gather saves this long into one transaction
RETRY_SECONDS = 5.0  # after a failed write (disk full, read-only), try again this often
SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    destination TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS verdicts_expiry ON verdicts (expires_at);
"""
# Rows worth reading: a record within the size bound and a destination no longer than a
# DNS name (sizes in bytes, whatever type a hostile row stored; a NULL is read, and fails).
_SMALL_ENOUGH = (
    "coalesce(length(CAST(record AS BLOB)), 0) <= ? AND "
    "coalesce(length(CAST(destination AS BLOB)), 0) <= ?"
)
_LIMITS = (MAX_RECORD_BYTES, MAX_NAME_LENGTH)


class SqliteStore(WriteBehindStore):
    kind = "sqlite"

    def __init__(self, state_dir: Path, metrics: Metrics) -> None:
        super().__init__(metrics)
        self.path = state_dir / FILE_NAME
        self._db: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-store")
        self._writer: asyncio.Task[None] | None = None
        self.detail = f"verdicts in {self.path}"

    async def start(self, on_remote: RemoteVerdict, on_forget: RemoteForget) -> list[Verdict]:
        loop = asyncio.get_running_loop()
        verdicts = await loop.run_in_executor(self._thread, self._open_and_load)
        self._writer = asyncio.create_task(self._write_behind())
        return verdicts

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None
        loop = asyncio.get_running_loop()
        if self._pending:
            await loop.run_in_executor(self._thread, self._write, self._take())
        await loop.run_in_executor(self._thread, self._close)
        self._thread.shutdown(wait=True)

    # -- the writer task ------------------------------------------------------------------

    async def _write_behind(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            await asyncio.sleep(FLUSH_DELAY_SECONDS)
            self._wake.clear()
            batch = self._take()
            if not await loop.run_in_executor(self._thread, self._write, batch):
                self._put_back(batch)
                await asyncio.sleep(RETRY_SECONDS)
                self._wake.set()

    # -- everything below runs on the store's one worker thread ---------------------------

    def _open_and_load(self) -> list[Verdict]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = self._connect()
        except sqlite3.OperationalError as e:  # permissions, read-only, disk full, locked
            return self._load_read_only(e)
        except sqlite3.DatabaseError as e:  # not a database, malformed image, failed check
            try:
                self._move_aside(e)
                self._db = self._connect()
            except (sqlite3.Error, OSError) as again:
                return self._unavailable("open", again)
        except OSError as e:
            return self._load_read_only(e)
        return self._load(self._db)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            (check,) = db.execute("PRAGMA quick_check").fetchone()
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
            db.executescript(SCHEMA)
        except sqlite3.Error:
            db.close()
            raise
        return db

    def _load_read_only(self, error: Exception) -> list[Verdict]:
        """The file cannot be opened for writing (a read-only mount or file): still serve
        the verdicts it holds, and say that new ones are not persisted. A WAL database on
        a read-only directory opens only as `immutable` (its -shm cannot be created);
        nothing can write it there anyway."""
        if not self.path.is_file():
            return self._unavailable("open", error)
        uri = f"file:{quote(str(self.path))}"
        db = None
        for mode in ("mode=ro", "immutable=1"):
            try:
                db = sqlite3.connect(f"{uri}?{mode}", uri=True, check_same_thread=False)
                (check,) = db.execute("PRAGMA quick_check").fetchone()
                if check != "ok":
                    raise sqlite3.DatabaseError(f"integrity check failed: {check}")
                break
            except sqlite3.Error as e:
                if db is not None:
                    db.close()
                db, error = None, e
        if db is None:
            return self._unavailable("open", error)
        try:
            verdicts = self._load(db, read_only=True)
        finally:
            db.close()
        self.metrics.store_errors.labels(self.kind, "open").inc()
        self.mark(
            False,
            f"cannot write {self.path} ({error}): loaded {len(verdicts)} "
            "verdict(s) from it read-only; new verdicts are kept in memory "
            "only",
        )
        return verdicts

    def _move_aside(self, error: Exception) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self.path}{suffix}")
            if source.exists():
                source.replace(Path(f"{self.path}.corrupt-{stamp}{suffix}"))
        self.metrics.store_errors.labels(self.kind, "corrupt").inc()
        log.warning(
            "state file %s is unreadable (%s); moved it to %s.corrupt-%s and starting "
            "with no stored verdicts",
            self.path,
            error,
            self.path,
            stamp,
        )

    def _unavailable(self, op: str, error: Exception) -> list[Verdict]:
        self.metrics.store_errors.labels(self.kind, op).inc()
        self.mark(False, f"cannot use {self.path}: {error}; serving from memory only")
        return []

    def _load(self, db: sqlite3.Connection, read_only: bool = False) -> list[Verdict]:
        """Every row that validates (sidecar.verdicts.decode_record); the others are dropped,
        counted and summed up in one log line. Rows are read one at a time, and oversized
        ones are only counted (in SQL), never read into memory."""
        now = time.time()
        verdicts: list[Verdict] = []
        bad, first = 0, ""
        try:
            if not read_only:
                db.execute(
                    "DELETE FROM verdicts WHERE expires_at < ?", (now - STALE_GRACE_SECONDS,)
                )
            (oversized,) = db.execute(
                f"SELECT count(*) FROM verdicts WHERE NOT ({_SMALL_ENOUGH})", _LIMITS
            ).fetchone()
            if oversized:
                bad, first = oversized, f"{oversized} row(s) over {MAX_RECORD_BYTES} bytes"
            rows = db.execute(
                f"SELECT destination, record FROM verdicts WHERE {_SMALL_ENOUGH}", _LIMITS
            )
            for destination, record in rows:
                try:
                    verdict = decode_record(record)
                    if verdict.destination != destination:
                        raise ValueError(f"the record is for {verdict.destination}")
                except ValueError as e:
                    bad += 1
                    first = first or f"{str(destination)!r}: {e}"
                    continue
                if verdict.expires_at + STALE_GRACE_SECONDS >= now:
                    verdicts.append(verdict)
        except sqlite3.Error as e:
            return self._unavailable("load", e)
        if bad:
            self.metrics.store_invalid_records.labels(self.kind, "load").inc(bad)
            log.warning(
                "dropped %d invalid stored verdict(s) in %s (first: %s)", bad, self.path, first
            )
        log.info("loaded %d verdict(s) from %s", len(verdicts), self.path)
        return verdicts

    def _write(self, batch: dict[str, Verdict | None]) -> bool:
        if self._db is None:
            try:
                self._db = self._connect()
            except (sqlite3.Error, OSError) as e:
                self.metrics.store_errors.labels(self.kind, "write").inc()
                self.mark(False, f"cannot open {self.path}: {e}; serving from memory only")
                return False
        upserts = [
            (n, json.dumps(to_record(v)), v.expires_at) for n, v in batch.items() if v is not None
        ]
        deletes = [(n,) for n, v in batch.items() if v is None]
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT INTO verdicts (destination, record, expires_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (destination) DO UPDATE SET record = excluded.record, "
                    "expires_at = excluded.expires_at",
                    upserts,
                )
                self._db.executemany("DELETE FROM verdicts WHERE destination = ?", deletes)
        except sqlite3.Error as e:
            self.metrics.store_errors.labels(self.kind, "write").inc()
            self.mark(False, f"cannot write {self.path}: {e}; serving from memory, retrying")
            return False
        if not self.up:
            self.mark(True, f"verdicts in {self.path}")
        return True

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
