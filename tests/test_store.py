"""Tests for the SQLite results store: round trip, idempotent keys, WAL, concurrent writers, bad files."""

import multiprocessing
import sqlite3

import pytest

from mupderive.errors import MupError
from mupderive.verify.store import SCHEMA_VERSION, Run, Store


def make_run(key: str, **changes) -> Run:
    fields = dict(
        key=key, sweep="s1", rule="adamw", rule_sha256="r" * 64, model="mlp", parameterization="standard",
        setup_sha256="c" * 64, width=64, lr=1e-3, seed=0, steps=10, batch_size=8, status="ok", diverged_step=None,
        train_loss=2.5, val_loss=2.6, losses=[4.5, 3.0, 2.5], wall_s=0.25, device="cpu", torch_version="2.x",
        config={"widths": [32, 64], "nested": {"a": 1}})
    return Run(**fields | changes)


def test_round_trip_keeps_every_field(tmp_path):
    with Store(tmp_path / "runs.db") as store:
        assert store.add(make_run("k1"))
        assert store.add(make_run("k2", status="diverged", diverged_step=3, train_loss=None, val_loss=None,
                                  losses=[4.5, float("inf")]))
        first, second = store.runs()
    assert first.key == "k1" and first.losses == [4.5, 3.0, 2.5] and first.config["nested"] == {"a": 1}
    assert first.train_loss == 2.5 and first.width == 64 and first.lr == 1e-3
    assert first.id < second.id and first.finished_at.endswith("Z")
    assert second.status == "diverged" and second.diverged_step == 3 and second.train_loss is None
    assert second.losses == [4.5, float("inf")]


def test_adding_a_stored_key_again_changes_nothing(tmp_path):
    with Store(tmp_path / "runs.db") as store:
        assert store.add(make_run("k1", train_loss=1.0))
        assert not store.add(make_run("k1", train_loss=9.0))
        assert store.has("k1") and not store.has("k2")
        assert [r.train_loss for r in store.runs()] == [1.0]
        assert [r.key for r in store.runs(["k2", "k1"])] == ["k1"]


def test_store_reopens_with_its_runs_and_uses_wal(tmp_path):
    path = tmp_path / "runs.db"
    with Store(path) as store:
        store.add(make_run("k1"))
    with Store(path) as store:
        assert [r.key for r in store.runs()] == ["k1"]
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_status_is_constrained(tmp_path):
    with Store(tmp_path / "runs.db") as store, pytest.raises(sqlite3.IntegrityError):
        store.add(make_run("k1", status="crashed"))


def test_a_file_that_is_not_a_store_is_a_user_error(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(MupError, match="not a usable results store"):
        Store(junk)
    newer = tmp_path / "newer.db"
    sqlite3.connect(newer).execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}").connection.close()
    with pytest.raises(MupError, match="schema version"):
        Store(newer)


def _writer(path: str, keys: list[str]) -> int:
    with Store(path) as store:
        return sum(store.add(make_run(key)) for key in keys)


def test_concurrent_processes_share_a_store_without_duplicates(tmp_path):
    path = str(tmp_path / "runs.db")
    overlapping = [[f"k{i}" for i in range(start, start + 60)] for start in (0, 30, 45)]
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        inserted = pool.starmap(_writer, [(path, keys) for keys in overlapping])
    with Store(path) as store:
        keys = [r.key for r in store.runs()]
    assert sorted(keys) == sorted({f"k{i}" for i in range(105)})
    assert sum(inserted) == 105  # every key inserted exactly once, whoever won
