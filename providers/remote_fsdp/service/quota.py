"""Disk quotas per user: everything a user's work writes, claimed before it is written (507 naming the quota).

A user's use is what the records naming the user as owner point at:
  datasets/users/NAME/           its uploaded datasets (the single admin's and the service's: datasets/*.jsonl)
  each of its jobs' run dir      the rows copied in (train.jsonl, validation.jsonl), logs, default checkpoints
  each of its jobs' checkpoint   dir when the job named one outside its run dir (teacher outputs too)
  what add-ons register          (`sources`): the OpenAI files it uploaded, the `ft:` models made to continue
                                 from its jobs
The data dir's own quota (--max-data-gb, security.DiskQuota) holds everyone's uploads and downloads together;
with a UserQuotas attached, it also counts the copies jobs make of them (flag DATA_DIR below), and every claim
on it is a claim on the claiming user's quota too. Training output is written by the job's processes, not by
the service: a user over quota gets a 507 for new work, and its running jobs fail, naming the quota, within
WATCH_INTERVAL_S of it (a disk quota's EDQUOT, at the next check instead of the next write).

Scans are bounded: one scan measures every user at once and is kept for SCAN_TTL_S (a claimed write that lands
marks it stale), and an ended job's directories are measured once.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter

from ... import access
from ...jobs.store import ACTIVE
from .security import DiskQuota, QuotaExceeded, bytes_under

FsdpJobService = Any  # jobs.FsdpJobService, which imports this module (rows_bytes): named, not imported

if TYPE_CHECKING:
    from .users import UserKeys

log = logging.getLogger("providers.remote_fsdp.quota")

SCAN_TTL_S = 5.0  # how long one scan of everyone's use is trusted (claims in between are counted exactly)
WATCH_INTERVAL_S = 5.0  # how often the users with running jobs are checked against their quota
USER, DATA_DIR = 1, 2  # what a held path counts against: its owner's quota, the data dir's (beyond its own dirs)
ROW_FILES = ("train.jsonl", "validation.jsonl")  # a job's copies of its rows, in its run dir
GB = 1 << 30

# (owner, path, counts against: USER | DATA_DIR, a version while the path does not change (an ended job's end
# time): its size is measured once per version; None: measured on every scan)
Held = tuple[str | None, Path, int, Any]


class UserQuotas:
    """Each user's bytes on disk and claims in progress, against the user's `max_data_gb` (UserLimits)."""

    def __init__(self, service: FsdpJobService):
        self.service = service
        # What each add-on holds for users: callables yielding Held tuples (the core's: datasets and jobs)
        self.sources: list[Callable[[], Iterable[Held]]] = [self._datasets, self._jobs]
        self._lock = threading.Lock()
        self._scan: tuple[dict[str | None, int], int] = ({}, 0)  # bytes by owner, bytes counted by the data dir
        self._scanned_at = -math.inf
        self._reserved: dict[str | None, int] = {}
        self._settled: dict[tuple[Path, int, Any], int] = {}  # (path, flags, version): bytes
        self._outputs: dict[str, Path | None] = {}  # job -> its checkpoint dir outside its run dir
        self._watcher: threading.Thread | None = None

    # -- what users hold -------------------------------------------------------------------------------------
    def _datasets(self) -> Iterator[Held]:
        root = self.service.datasets_dir
        for p in root.glob("*.jsonl"):  # the single admin's and the service's (FsdpJobService.user_datasets_dir)
            yield access.LOCAL_ADMIN.name, p, USER, None
        users = root / "users"
        if users.is_dir():
            for d in users.iterdir():
                yield d.name, d, USER, None

    def _jobs(self) -> Iterator[Held]:
        for job in self.service.jobs.store.list(everyone=True):
            version = None if job.status in ACTIVE else job.completed_at  # a resumed job's next end: another
            run_dir = Path(job.run_dir)
            yield job.owner, run_dir, USER, version
            for name in ROW_FILES:
                yield job.owner, run_dir / name, DATA_DIR, version
            out = self._output_dir(job.job_uuid, run_dir)
            if out is not None:
                yield job.owner, out, USER, version

    def _output_dir(self, job_uuid: str, run_dir: Path) -> Path | None:
        """The job's checkpoint dir when it lies outside its run dir (read once from its spec)."""
        if job_uuid not in self._outputs:
            try:
                out = Path(json.loads((run_dir / "spec.json").read_text())["checkpoint"]["output_dir"])
            except (OSError, ValueError, KeyError, TypeError):
                return None  # not written yet: asked again on the next scan
            self._outputs[job_uuid] = None if out == run_dir or run_dir in out.parents else out
        return self._outputs[job_uuid]

    def _rescan(self) -> None:
        by_owner: dict[str | None, int] = {}
        data_dir = 0
        for source in self.sources:
            for owner, path, counts, version in source():
                key = (path, counts, version)
                size = self._settled.get(key) if version is not None else None
                if size is None:
                    size = bytes_under(path)
                    if version is not None:
                        self._settled[key] = size
                if counts & USER:
                    by_owner[owner] = by_owner.get(owner, 0) + size
                if counts & DATA_DIR:
                    data_dir += size
        self._scan, self._scanned_at = (by_owner, data_dir), time.monotonic()

    def _fresh(self) -> tuple[dict[str | None, int], int]:
        if time.monotonic() - self._scanned_at > SCAN_TTL_S:
            self._rescan()
        return self._scan

    # -- what the data dir's quota asks ----------------------------------------------------------------------
    def data_dir_bytes(self) -> int:
        """The jobs' copies of rows and what add-ons flag DATA_DIR: counted by the data dir's quota too."""
        with self._lock:
            return self._fresh()[1]

    def used(self, owner: str | None) -> int:
        """Bytes the user holds on disk plus its claims in progress."""
        with self._lock:
            return self._fresh()[0].get(owner, 0) + self._reserved.get(owner, 0)

    def limit_of(self, owner: str | None) -> int | None:
        """The user's max_data_gb in bytes; None: only the data dir's quota applies."""
        limits = self.service.jobs.limits_of(owner)
        return None if limits is None or limits.max_data_gb is None else int(limits.max_data_gb * GB)

    def reserve(self, owner: str | None, nbytes: int, what: str) -> None:
        """Claim `nbytes` more for `owner`, or raise QuotaExceeded naming the user's quota (nothing claimed)."""
        limit = self.limit_of(owner)
        with self._lock:
            held = self._fresh()[0].get(owner, 0) + self._reserved.get(owner, 0)
            if limit is not None and held + nbytes > limit:
                raise QuotaExceeded(
                    f"{what}: the quota of user {owner!r} (max_data_gb = {limit / GB:g} GB, {limit} bytes, in "
                    f"--api-keys-file) would be exceeded: its datasets, files, jobs and models hold {held} bytes "
                    f"and {nbytes} more were asked for; delete files or datasets it no longer needs")
            self._reserved[owner] = self._reserved.get(owner, 0) + nbytes

    def release(self, owner: str | None, nbytes: int) -> None:
        """Give back a claim: its bytes are on disk now (or were never written), so the next check rescans."""
        with self._lock:
            self._reserved[owner] = max(0, self._reserved.get(owner, 0) - nbytes)
            self._scanned_at = -math.inf

    def report(self, names: Iterable[str | None]) -> list[dict[str, Any]]:
        """Each user's bytes and limit (the users named, and any other owner that holds something)."""
        with self._lock:
            by_owner = self._fresh()[0]
            owners = list(dict.fromkeys([*names, *by_owner]))
            return [{"user": o, "bytes": by_owner.get(o, 0) + self._reserved.get(o, 0),
                     "reserved": self._reserved.get(o, 0),
                     "max_data_gb": getattr(self.service.jobs.limits_of(o), "max_data_gb", None),
                     "limit_bytes": self.limit_of(o)} for o in owners]

    # -- training output: a user over quota stops writing ----------------------------------------------------
    def over_quota(self, owner: str | None) -> str | None:
        """Why `owner` may write no more (its quota is full), or None."""
        limit = self.limit_of(owner)
        held = self.used(owner)
        if limit is None or held <= limit:
            return None
        return (f"user {owner!r} is over its quota (max_data_gb = {limit / GB:g} GB, {limit} bytes, in "
                f"--api-keys-file): its datasets, files, jobs and models hold {held} bytes; the job was stopped "
                "(free space, then resume it)")

    def stop_jobs_over_quota(self) -> None:
        """Fail the running jobs of every user over its quota, naming the quota."""
        with access.acting_as(None):
            running = self.service.jobs.store.list(statuses=("in_progress",), everyone=True)
            for owner in {j.owner for j in running}:
                reason = self.over_quota(owner)
                if reason is None:
                    continue
                for job in (j for j in running if j.owner == owner):
                    log.warning("job %s: %s", job.job_uuid, reason)
                    self.service.jobs.cancel(job.job_uuid, reason)

    def watch(self) -> None:
        """Check users with running jobs every WATCH_INTERVAL_S (a daemon thread; only where users have limits)."""
        if self._watcher is not None:
            return

        def loop() -> None:
            while True:
                time.sleep(WATCH_INTERVAL_S)
                try:
                    self.stop_jobs_over_quota()
                except Exception:  # noqa: BLE001 - the watch outlives any one scan's failure
                    log.exception("quota watch failed")

        self._watcher = threading.Thread(target=loop, name="quota-watch", daemon=True)
        self._watcher.start()


def rows_bytes(service: FsdpJobService, data_config: Any, rows: Any, validation_rows: Any) -> int:
    """About what a job's copies of its rows take in its run dir: the inline rows' JSON, or the datasets' sizes."""
    total = 0
    for given, dataset_id in ((rows, data_config.dataset_id), (validation_rows, data_config.validation_dataset_id)):
        if given is not None:
            total += len(json.dumps(given, default=str))
        elif dataset_id:
            total += bytes_under(service.dataset_path(dataset_id))
    return max(1, total)


def attach(service: FsdpJobService, keys: UserKeys | None) -> UserQuotas:
    """The service's user quotas, made the data dir quota's companion: every claim on --max-data-gb is then a
    claim on the claiming user's quota too, and jobs' copies of rows count against --max-data-gb."""
    quotas = UserQuotas(service)
    DiskQuota.of(service.config).users = quotas
    if keys is not None and any(quotas.limit_of(n) is not None for n in keys.names()):
        quotas.watch()
    return quotas


def quotas_of(service: FsdpJobService) -> UserQuotas | None:
    return DiskQuota.of(service.config).users


def usage_router(quotas: UserQuotas, keys: UserKeys | None) -> APIRouter:
    """GET /admin/usage: each user's bytes held and limit (mounted behind client auth and require_admin)."""
    r = APIRouter()

    @r.get("/admin/usage")
    def usage() -> dict[str, Any]:
        names = keys.names() if keys is not None else [access.LOCAL_ADMIN.name]
        dq = DiskQuota.of(quotas.service.config)
        return {"data_dir": {"bytes": dq.used(), "max_data_gb": dq.limit / GB, "limit_bytes": dq.limit},
                "users": quotas.report(names)}

    return r
