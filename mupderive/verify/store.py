"""SQLite store of training runs (stdlib sqlite3), shared by resumable and concurrent sweeps.

One row per run (width x lr x seed of a sweep), written and committed as soon as the run finishes. A run's `key` is
the sha256 of everything that determines its result and is UNIQUE, so inserting it again is a no-op: a sweep
restarted after a kill skips the finished runs, and two processes sharing a file never duplicate one. WAL mode and
a busy timeout let concurrent writers wait for each other instead of failing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from mupderive.errors import MupError

SCHEMA_VERSION = 2  # 2: the depth column (a version-1 store gains it, NULL for its runs)
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,               -- insertion order
    key TEXT NOT NULL UNIQUE,             -- sha256 of the run's identity (sweep identity + width/depth + lr + seed)
    sweep TEXT NOT NULL,                  -- sha256 of the sweep identity (all that fixes a run but these)
    rule TEXT NOT NULL,
    rule_sha256 TEXT NOT NULL,            -- sha256 of the rule file
    model TEXT NOT NULL,                  -- 'mlp' | 'gpt'
    parameterization TEXT NOT NULL,       -- 'derived' | 'standard'
    setup_sha256 TEXT NOT NULL,           -- generated module source, or the standard configuration (JSON)
    width INTEGER NOT NULL,
    depth INTEGER,                        -- a depth sweep's number of blocks (NULL: the model's own depth)
    lr REAL NOT NULL,
    seed INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    batch_size INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'diverged')),
    diverged_step INTEGER,                -- first step with a NaN/inf or exploded loss
    train_loss REAL,                      -- mean of the last steps' training losses (NULL when diverged)
    val_loss REAL,                        -- validation loss at the end (NULL when diverged)
    losses TEXT NOT NULL,                 -- JSON list of every step's training loss
    wall_s REAL NOT NULL,
    device TEXT NOT NULL,
    torch_version TEXT NOT NULL,
    config TEXT NOT NULL,                 -- JSON: the full configuration of the sweep that ran it
    finished_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
"""


@dataclass(frozen=True)
class Run:
    """One finished run, as stored (id and finished_at are filled by the store)."""

    key: str
    sweep: str
    rule: str
    rule_sha256: str
    model: str
    parameterization: str
    setup_sha256: str
    width: int
    lr: float
    seed: int
    steps: int
    batch_size: int
    status: str
    diverged_step: int | None
    train_loss: float | None
    val_loss: float | None
    losses: list[float]
    wall_s: float
    device: str
    torch_version: str
    config: dict
    depth: int | None = None  # a depth sweep's number of blocks (None: the model's own depth, a width sweep)
    id: int | None = None
    finished_at: str | None = None


_COLUMNS = [f.name for f in fields(Run)]
_WRITTEN = _COLUMNS[:-2]
_CHUNK = 500  # keys per query, below SQLite's limit on bound parameters


class Store:
    """A runs database at `path` (created on first use); use as a context manager or call close()."""

    def __init__(self, path: str | Path, timeout: float = 60.0):
        self.path = Path(path)
        try:
            self.db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")  # one process creates the schema; the others wait
                version = self.db.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, 1, SCHEMA_VERSION):
                    raise MupError(f"{self.path}: store schema version {version}, expected {SCHEMA_VERSION}")
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                if version == 1:  # a width-only store: its runs keep their own depth
                    self.db.execute("ALTER TABLE runs ADD COLUMN depth INTEGER")
                self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise MupError(f"{self.path}: not a usable results store ({exc})") from None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.db.close()

    def add(self, run: Run) -> bool:
        """Insert and commit a finished run; False (and nothing written) if its key is already stored."""
        values = list(astuple(run))[: len(_WRITTEN)]
        values[_WRITTEN.index("losses")] = json.dumps(run.losses)
        values[_WRITTEN.index("config")] = json.dumps(run.config, sort_keys=True)
        with self.db:
            cursor = self.db.execute(
                f"INSERT INTO runs ({', '.join(_WRITTEN)}) VALUES ({', '.join('?' * len(_WRITTEN))}) "
                "ON CONFLICT (key) DO NOTHING", values)
        return cursor.rowcount == 1

    def has(self, key: str) -> bool:
        """Whether a run with this key is stored."""
        return self.db.execute("SELECT 1 FROM runs WHERE key = ?", (key,)).fetchone() is not None

    def runs(self, keys: Iterable[str] | None = None) -> list[Run]:
        """Stored runs (those with the given keys, or all), in insertion order."""
        select = f"SELECT {', '.join(_COLUMNS)} FROM runs"
        if keys is None:
            return [_run(row) for row in self.db.execute(f"{select} ORDER BY id")]
        wanted, rows = sorted(set(keys)), []
        for start in range(0, len(wanted), _CHUNK):  # the key column is unique, hence indexed
            chunk = wanted[start:start + _CHUNK]
            rows += self.db.execute(f"{select} WHERE key IN ({', '.join('?' * len(chunk))})", chunk).fetchall()
        return [_run(row) for row in sorted(rows, key=lambda row: row[_COLUMNS.index("id")])]


def _run(row: tuple) -> Run:
    record = dict(zip(_COLUMNS, row, strict=True))
    return Run(**record | {"losses": json.loads(record["losses"]), "config": json.loads(record["config"])})
