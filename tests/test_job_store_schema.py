"""The job store's schema version (PRAGMA user_version) and its migrations: a store from before versions
opens and gains the columns, a store from a newer version is refused untouched, a failed migration leaves
the store as it was. Unit tests on real SQLite files; tests/test_upgrade.py opens a real old data dir."""

from __future__ import annotations

import sqlite3

import pytest

from providers.jobs.store import MIGRATIONS, SCHEMA_VERSION, JobStore, StoreTooNew, migrate


def version(path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


def test_a_store_from_before_schema_versions_is_migrated_and_keeps_its_rows(tmp_path):
    path = tmp_path / "jobs.db"
    db = sqlite3.connect(path)  # the first release's table: no launcher, external_id, priority, attempts
    db.execute("CREATE TABLE jobs (job_uuid TEXT PRIMARY KEY, method TEXT, run_dir TEXT, status TEXT, "
               "scheduled_at TEXT, started_at TEXT, completed_at TEXT, pid INTEGER, error TEXT, resources TEXT, "
               "seq INTEGER)")
    db.execute("INSERT INTO jobs VALUES ('old', 'sft', '/r/old', 'completed', 't0', 't1', 't2', NULL, NULL, "
               "'{\"model\": \"m\"}', 1)")
    db.commit()
    db.close()
    assert version(path) == 0
    store = JobStore(path)
    job = store.get("old")
    assert (job.status, job.launcher, job.priority, job.attempts, job.resources) == ("completed", "local", 0, 0,
                                                                                      {"model": "m"})
    assert version(path) == SCHEMA_VERSION
    JobStore(path)  # opening a current store again changes nothing
    assert version(path) == SCHEMA_VERSION


def test_a_new_store_starts_at_the_current_version(tmp_path):
    JobStore(tmp_path / "jobs.db")
    assert version(tmp_path / "jobs.db") == SCHEMA_VERSION == max(MIGRATIONS)
    assert sorted(MIGRATIONS) == list(range(1, SCHEMA_VERSION + 1))  # no gaps: each step runs in order


def test_a_store_written_by_a_newer_version_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "jobs.db"
    JobStore(path).checkpoint()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    before = path.read_bytes()
    with pytest.raises(StoreTooNew) as e:
        JobStore(path)
    assert f"schema version {SCHEMA_VERSION + 1}" in str(e.value) and "newer version" in str(e.value)
    assert str(path) in str(e.value)
    assert path.read_bytes() == before and version(path) == SCHEMA_VERSION + 1
    assert not list(tmp_path.glob("jobs.db.corrupt-*"))  # not mistaken for a corrupt store


def test_a_failing_migration_leaves_the_store_as_it_was(tmp_path):
    path = tmp_path / "jobs.db"
    JobStore(path)

    def add_column(db):
        db.execute("ALTER TABLE jobs ADD COLUMN note TEXT")

    def broken(db):
        raise sqlite3.OperationalError("migration 3 failed")

    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError):
        migrate(db, path, {**MIGRATIONS, SCHEMA_VERSION + 1: add_column, SCHEMA_VERSION + 2: broken})
    db.execute("ROLLBACK")
    assert "note" not in {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()
