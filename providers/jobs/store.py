"""JobStore: job records in SQLite, so that no job is lost when the server restarts."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import access
from ..errors import Conflict
from ..training.run_files import SpaceReserve, no_space_left

log = logging.getLogger("providers.jobs")

ACTIVE = ("scheduled", "in_progress")
FINISHED = ("completed", "failed", "cancelled")


class DuplicateJobError(Conflict):
    pass


STORE_RESERVE_BYTES = 2 << 20  # kept back beside jobs.db for job ends and their causes when the disk fills


class StoreUnavailable(RuntimeError):
    """The job store cannot be read or written now (disk full, read-only, locked by another process): the
    service answers 507 (`full`) or 503 with this reason; a job's end is held until it can be written."""

    def __init__(self, message: str, full: bool = False):
        super().__init__(message)
        self.full = full


def _full(db_path: Path, e: sqlite3.Error) -> bool:
    return getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or no_space_left([db_path.parent]) is not None


def _unavailable(db_path: Path, e: sqlite3.Error) -> StoreUnavailable:
    return StoreUnavailable(f"the job store {db_path} cannot be written: {e} (free space on its file system, "
                            "make it writable, or stop the process that holds it)", full=_full(db_path, e))


class UnknownJobError(KeyError):
    def __str__(self) -> str:
        return f"unknown job_uuid {self.args[0]!r}"


@dataclass
class JobRecord:
    job_uuid: str
    method: str
    run_dir: str
    status: str = "scheduled"
    scheduled_at: str | None = None
    started_at: str | None = None
    completed_at: str | None = None
    pid: int | None = None
    error: str | None = None
    resources: dict[str, Any] = field(default_factory=dict)
    launcher: str = "local"  # the launcher that runs it (a name in providers/launchers' registry)
    external_id: str | None = None  # the launcher's id of the current run: pgid, Slurm job id, Ray submission id
    priority: int = 0  # higher starts first
    attempts: int = 0  # runs started so far (retries and resumes included)
    owner: str | None = None  # the user whose request made it (providers/access.py); None: before users


_COLUMNS = [f for f in JobRecord.__dataclass_fields__]


class StoreTooNew(RuntimeError):
    """The job store was written by a newer version of this software (its schema version is higher than any
    this one knows): opening it could lose what that version stored, so the service refuses to start."""


def _v1_baseline(db: sqlite3.Connection) -> None:
    """Stores from before schema versions (user_version 0): the jobs table with every column the releases
    without a version added over time (a store from any of them gains the missing ones)."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS jobs (job_uuid TEXT PRIMARY KEY, method TEXT, run_dir TEXT, status TEXT, "
        "scheduled_at TEXT, started_at TEXT, completed_at TEXT, pid INTEGER, error TEXT, resources TEXT, "
        "seq INTEGER)"
    )
    have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    for column, kind in (("launcher", "TEXT DEFAULT 'local'"), ("external_id", "TEXT"),
                         ("priority", "INTEGER DEFAULT 0"), ("attempts", "INTEGER DEFAULT 0")):
        if column not in have:
            db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")


def _v2_owner(db: sqlite3.Connection) -> None:
    """Users: every job records the user who submitted it (jobs from before have none: admins see them)."""
    db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, status)")


# Schema version -> the migration that brings a store at the version before it to that version. Append only:
# a schema change adds the next number (never edit a released one); SCHEMA_VERSION is the highest.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _v1_baseline,
    2: _v2_owner,
}
SCHEMA_VERSION = max(MIGRATIONS)


def migrate(db: sqlite3.Connection, db_path: Path,
            migrations: dict[int, Callable[[sqlite3.Connection], None]] = MIGRATIONS) -> int:
    """Bring the store to the newest schema version (PRAGMA user_version), applying each missing migration in
    order; call inside a write transaction, so that a failed migration leaves the store as it was. Raises
    StoreTooNew for a store written by a newer version. Returns the version the store had."""
    newest = max(migrations)
    found = db.execute("PRAGMA user_version").fetchone()[0]
    if found > newest:
        raise StoreTooNew(f"the job store {db_path} has schema version {found}, written by a newer version of this "
                          f"software (this one reads versions up to {newest}): run that version, or restore a "
                          "backup of the data dir made before the upgrade")
    for version in range(found + 1, newest + 1):
        log.info("job store %s: migrating to schema version %d", db_path, version)
        migrations[version](db)
    if found != newest:
        db.execute(f"PRAGMA user_version = {int(newest)}")
    return found


class JobStore:
    def __init__(self, db_path: str | Path):
        db_path = Path(db_path)
        self.path = db_path
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # job_uuid -> fields written to memory only, while the database cannot take them (see `hold`).
        self._held: dict[str, dict[str, Any]] = {}
        # Given up when a job's end finds the disk full (JobManager), or when the store cannot open for lack of
        # space: start-up then records the ends of the jobs it finds, and serves.
        self.reserved_space = SpaceReserve(db_path.with_name(f"{db_path.name}.reserve"), STORE_RESERVE_BYTES)
        try:
            try:
                self._open(db_path)
            except sqlite3.OperationalError as e:
                if not _full(db_path, e):
                    raise
                # A full disk: give up the space kept back, so that start-up records the ends it finds; with none
                # left, open for reading (the service serves degraded, JobManager holds job ends in memory).
                self.reserved_space.release(f"the job store could not take a write at start: {e}")
                try:
                    self._open(db_path)
                except sqlite3.OperationalError as e:
                    if not _full(db_path, e):
                        raise
                    self._open(db_path, write_probe=False)
        except sqlite3.OperationalError as e:
            # Locked, read-only, full: nothing is wrong with the file itself; setting it aside would lose jobs.
            raise _unavailable(db_path, e) from None
        except sqlite3.DatabaseError as e:
            # A corrupt store must not keep the server from starting: set it aside (for the operator to
            # inspect) and start an empty one.
            aside = db_path.with_name(f"{db_path.name}.corrupt-{int(time.time())}")
            log.error("job store %s is corrupt (%s); moved to %s, starting with no job records", db_path, e, aside)
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{db_path}{suffix}")
                if src.exists():
                    os.replace(src, f"{aside}{suffix}")
            self._open(db_path)
        if not self.reserved_space.make() and self.reserved_space.released_because is None:
            self.reserved_space.released_because = "there was no room for it at start"

    def _open(self, db_path: Path, write_probe: bool = True) -> None:
        # One connection shared by the server's threads, serialized by a lock; WAL keeps readers cheap.
        self._db = sqlite3.connect(str(db_path), check_same_thread=False, isolation_level=None, timeout=5)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA journal_size_limit=4194304")  # the WAL shrinks back after checkpoints
        # Can this process write it? (read-only file system, another process's exclusive lock): fail at start.
        # The migrations run inside this same write transaction: all of them or none.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            migrate(self._db, db_path)
            self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()
            if write_probe:  # a real write: a read-only disk fails here at start, not at the first job's end
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                self._db.execute(f"PRAGMA user_version = {int(version)}")
            self._db.execute("COMMIT")
        except BaseException:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:  # a corrupt file may refuse even that: the first error says what is wrong
                pass
            self._db.close()  # a second try opens its own (this one could still hold the write lock)
            raise

    def _execute(self, query: str, args=()) -> sqlite3.Cursor:
        """Run one statement under the lock; SQLite's operational errors (full, read-only, locked, I/O) become
        StoreUnavailable. Call with self._lock held."""
        try:
            return self._db.execute(query, args)
        except sqlite3.OperationalError as e:
            raise _unavailable(self.path, e) from None

    def checkpoint(self) -> None:
        """Fold the write-ahead log into jobs.db and truncate it: a clean stop leaves no WAL behind. The
        connection stays open (followers of scheduler jobs may still write)."""
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:
                log.warning("job store %s: checkpointing its write-ahead log failed: %s", self.path, e)

    def hold(self, job_uuid: str, **fields: Any) -> None:
        """Show `fields` in every read of the job until `release`: a job's end that the database cannot take
        yet (disk full) is what readers see meanwhile, never a stale `in_progress`."""
        with self._lock:
            self._held[job_uuid] = {**self._held.get(job_uuid, {}), **fields}

    def release(self, job_uuid: str) -> None:
        with self._lock:
            self._held.pop(job_uuid, None)

    def is_held(self, job_uuid: str) -> bool:
        return job_uuid in self._held

    def held(self) -> list[str]:
        """The jobs whose fields are held in memory, not yet written."""
        with self._lock:
            return list(self._held)

    def write_held(self, job_uuid: str) -> None:
        """Write the job's held fields now (raises StoreUnavailable if the database still cannot take them)."""
        with self._lock:
            fields = dict(self._held.get(job_uuid) or {})
        if fields:
            self.update(job_uuid, **fields)
            with self._lock:
                if self._held.get(job_uuid) == fields:  # unless a newer hold came meanwhile
                    del self._held[job_uuid]

    def exists(self, job_uuid: str) -> bool:
        with self._lock:
            return self._execute("SELECT 1 FROM jobs WHERE job_uuid = ?", [job_uuid]).fetchone() is not None

    def create(self, job: JobRecord) -> None:
        row = asdict(job)
        row["resources"] = json.dumps(job.resources)
        with self._lock:
            try:
                self._execute(
                    f"INSERT INTO jobs ({', '.join(_COLUMNS)}, seq) VALUES ({', '.join('?' * len(_COLUMNS))}, "
                    "(SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs))",
                    [row[c] for c in _COLUMNS],
                )
            except sqlite3.IntegrityError:
                raise DuplicateJobError(f"job_uuid {job.job_uuid!r} already exists") from None

    def update(self, job_uuid: str, **fields: Any) -> None:
        if "resources" in fields:
            fields["resources"] = json.dumps(fields["resources"])
        with self._lock:
            self._execute(
                f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)} WHERE job_uuid = ?",
                [*fields.values(), job_uuid],
            )

    def get(self, job_uuid: str) -> JobRecord:
        """The job, if the current user may see it (access.can_see): another user's job is as unknown as a
        job that does not exist."""
        with self._lock:
            row = self._execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE job_uuid = ?", [job_uuid]).fetchone()
        if row is None or not access.can_see(row[_COLUMNS.index("owner")]):
            raise UnknownJobError(job_uuid)
        return self._with_held(self._record(row))

    def owner_of(self, job_uuid: str) -> str | None:
        """Who submitted the job, whoever asks (None: no such job, or the service's own)."""
        with self._lock:
            row = self._execute("SELECT owner FROM jobs WHERE job_uuid = ?", [job_uuid]).fetchone()
        return row[0] if row else None

    def list(self, statuses: tuple[str, ...] | None = None, by_priority: bool = False, everyone: bool = False,
             _raw: bool = False) -> list[JobRecord]:
        """The jobs the current user may see (`everyone`: all of them, for the service's own bookkeeping such as
        queue limits and scheduling, whoever's request runs it)."""
        if not everyone and access.current() is not None and not access.current().is_admin:
            return [r for r in self.list(statuses, by_priority, everyone=True) if access.can_see(r.owner)]
        query = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
        args: list[str] = []
        if self._held and not _raw:  # held statuses differ from the rows': filter after applying them
            records = [self._with_held(r) for r in self.list(by_priority=by_priority, everyone=True, _raw=True)]
            return [r for r in records if not statuses or r.status in statuses]
        if statuses:
            query += f" WHERE status IN ({', '.join('?' * len(statuses))})"
            args = list(statuses)
        with self._lock:
            rows = self._execute(query + (" ORDER BY priority DESC, seq" if by_priority else " ORDER BY seq"),
                                    args).fetchall()
        return [self._record(r) for r in rows]

    def delete(self, job_uuid: str) -> None:
        with self._lock:
            self._execute("DELETE FROM jobs WHERE job_uuid = ?", [job_uuid])

    def _with_held(self, job: JobRecord) -> JobRecord:
        held = self._held.get(job.job_uuid)
        if not held:
            return job
        values = {**asdict(job), **held}
        if isinstance(values.get("resources"), str):
            values["resources"] = json.loads(values["resources"])
        return JobRecord(**values)

    @staticmethod
    def _record(row) -> JobRecord:
        values = dict(zip(_COLUMNS, row))
        values["launcher"] = values["launcher"] or "local"
        values["priority"] = values["priority"] or 0
        values["attempts"] = values["attempts"] or 0
        try:
            values["resources"] = json.loads(values["resources"] or "{}")
        except json.JSONDecodeError:
            values["resources"] = {}
        return JobRecord(**values)
