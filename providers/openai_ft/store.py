"""What the OpenAI fine-tuning API keeps besides the service's job store: uploaded files' metadata and each
fine-tuning job's OpenAI fields (ids, hyperparameters chosen, events before training), as JSON state files.

    DATA_DIR/files/FILE_ID.jsonl                 the uploaded bytes (inside the disk quota's dirs)
    DATA_DIR/openai_ft/files/FILE_ID.json        its FileObject fields and kind (chat / preference)
    DATA_DIR/openai_ft/jobs/FTJOB_ID.json        the job's OpenAI record; the training job itself is the
                                                 service's job FTJOB_ID (one job store)
    DATA_DIR/openai_ft/models/FTJOB_ID-final|step-N  an `ft:` model (or checkpoint) as a full model directory,
                                                 made when a job continues from it (an allowed model root)
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from .. import access
from ..errors import ClientError, NotFound
from ..state_files import load_state, save_state

FILE_ID = re.compile(r"file-[a-f0-9]{24}")
MAX_STORED_FILES = 1000  # files a data dir keeps (beyond: 429); a job's results file is never refused
LIST_FILES_LIMIT = 1000  # GET /files: the default and largest page (its records are the only ones read)
JOB_ID = re.compile(r"ftjob-[a-f0-9]{24}")
MODEL_FILES_SKIPPED = ("optimizer", "scheduler", "rng_state", "trainer_state", "training_args")  # Trainer state


def link_model_files(src: Path, dest: Path) -> None:
    """A checkpoint's model and tokenizer files in `dest`, hard-linked (copied across file systems); the
    Trainer's resume state (optimizer, scheduler, RNG) left out."""
    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith(MODEL_FILES_SKIPPED):
            try:
                os.link(f, dest / f.name)
            except OSError:
                shutil.copy2(f, dest / f.name)


class TooManyFiles(ClientError):
    status = 429


class FtState:
    """Files and jobs of the OpenAI API, one JSON state file each; a lock per process keeps read-modify-write
    updates whole. Each record names its `owner` (the user whose request made it): reads see only what the
    current user may (access.can_see), so another user's file or job is as unknown as a missing one."""

    def __init__(self, data_dir: Path):
        self.blobs = data_dir / "files"
        self.files_dir = data_dir / "openai_ft" / "files"
        self.jobs_dir = data_dir / "openai_ft" / "jobs"
        self.models_dir = data_dir / "openai_ft" / "models"
        for d in (self.blobs, self.files_dir, self.jobs_dir, self.models_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()

    # -- files --------------------------------------------------------------------------------------
    def blob(self, file_id: str) -> Path:
        return self.blobs / f"{file_id}.jsonl"

    def put_file(self, meta: dict[str, Any]) -> None:
        meta.setdefault("owner", access.owner_name())
        save_state(self.files_dir / f"{meta['id']}.json", meta)

    def get_file(self, file_id: str, field: str = "file_id") -> dict[str, Any]:
        """The file's record; NotFound naming `field` for an unknown (or malformed) id."""
        meta = load_state(self.files_dir / f"{file_id}.json", None) if FILE_ID.fullmatch(file_id) else None
        if meta is None or not access.can_see(meta.get("owner")):
            raise NotFound(f"{field}: no file {file_id[:100]!r}")
        return meta

    def list_files(self) -> list[dict[str, Any]]:
        """Every file the current user may see, newest first (at most MAX_STORED_FILES and the results files)."""
        metas = [load_state(p, None) for p in self.files_dir.glob("file-*.json")]
        return sorted((m for m in metas if m and access.can_see(m.get("owner"))), key=lambda m: (m["created_at"], m["id"]), reverse=True)

    def files_page(self, after: str | None = None, limit: int = LIST_FILES_LIMIT,
                   purpose: str | None = None) -> tuple[list[dict[str, Any]], bool]:
        """A page of the files the current user may see, newest first: at most `limit` after the one whose id is
        `after` (none if it is unknown), and whether more follow. Records are ordered by their write time
        (a stat each) and read only until the page is full."""
        stats = []
        for path in self.files_dir.glob("file-*.json"):
            try:
                stats.append((path.stat().st_mtime_ns, path.stem))
            except FileNotFoundError:  # deleted since the listing
                continue
        ids = [file_id for _, file_id in sorted(stats, reverse=True)]
        if after:
            ids = ids[ids.index(after) + 1:] if after in ids else []
        page = []
        for file_id in ids:
            meta = load_state(self.files_dir / f"{file_id}.json", None)
            if meta and access.can_see(meta.get("owner")) and purpose in (None, meta.get("purpose")):
                if len(page) == limit:
                    return page, True
                page.append(meta)
        return page, False

    def check_room(self) -> None:
        """TooManyFiles when the data dir holds MAX_STORED_FILES files, or the current user its max_files."""
        paths = list(self.files_dir.glob("file-*.json"))
        if len(paths) >= MAX_STORED_FILES:
            raise TooManyFiles(f"file: this service keeps at most {MAX_STORED_FILES} files and holds {len(paths)}: "
                               "delete some (DELETE /v1/openai/v1/files/FILE_ID), then upload again")
        user = access.current()
        limit = user.limits.max_files if user is not None else None
        if limit is not None:  # at most MAX_STORED_FILES small reads
            mine = sum(1 for p in paths if (load_state(p, None) or {}).get("owner") == user.name)
            if mine >= limit:
                raise TooManyFiles(f"file: user {user.name!r} keeps at most {limit} files (its max_files) and holds "
                                   f"{mine}: delete some (DELETE /v1/openai/v1/files/FILE_ID), then upload again")

    def delete_file(self, file_id: str) -> None:
        self.blob(file_id).unlink(missing_ok=True)
        (self.files_dir / f"{file_id}.json").unlink(missing_ok=True)

    # -- jobs ---------------------------------------------------------------------------------------
    def put_job(self, rec: dict[str, Any]) -> None:
        rec.setdefault("owner", access.owner_name())
        save_state(self.jobs_dir / f"{rec['id']}.json", rec)

    def get_job(self, job_id: str) -> dict[str, Any]:
        rec = load_state(self.jobs_dir / f"{job_id}.json", None) if JOB_ID.fullmatch(job_id) else None
        if rec is None or not access.can_see(rec.get("owner")):
            raise NotFound(f"fine_tuning_job_id: no fine-tuning job {job_id[:100]!r}")
        return rec

    def list_jobs(self) -> list[dict[str, Any]]:
        """Every job, newest first (by `t`: two jobs are often created within the same second)."""
        recs = [load_state(p, None) for p in self.jobs_dir.glob("ftjob-*.json")]
        return sorted((r for r in recs if r and access.can_see(r.get("owner"))),
                      key=lambda r: (r.get("t", r["created_at"]), r["id"]), reverse=True)

    def add_event(self, job_id: str, message: str, level: str = "info", at: float | None = None,
                  **updates: Any) -> dict[str, Any]:
        """Append an event (at `at`, Unix seconds; default now) to a job's record, with `updates` to its fields in
        the same write; the record."""
        with self.lock:
            rec = self.get_job(job_id)
            rec.update(updates)
            now = time.time() if at is None else at  # `t` orders events within a second; the API shows created_at
            rec.setdefault("events", []).append({"created_at": int(now), "t": now, "level": level,
                                                 "message": message})
            self.put_job(rec)
            return rec
