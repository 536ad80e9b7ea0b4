"""JobManager: queue, launch, supervise and cancel training processes; shared by both providers.

Each job runs as its own process group (the training entry point, or torchrun and its ranks), so the
server stays responsive and cancel can stop every process of a job with one signal.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import access
from ..errors import BadRequest, client_errors
from ..training.run_files import DEFAULT_PROGRESS_TIMEOUT_S, RunFiles, no_space_left, progress_limit, utc_now
from ..launchers.base import ACTIVE_STATUS, Launcher, LaunchRequest, LaunchState, final_state
from ..launchers.local import LocalLauncher, kill_process_group, process_group_alive, process_group_runs
from ..training.spec import JobSpec, check_name
from . import zygote
from .child_env import child_env
from .store import ACTIVE, DuplicateJobError, JobRecord, JobStore, StoreUnavailable, UnknownJobError

__all__ = ["JobManager", "QueueFullError", "kill_process_group", "process_group_alive", "process_group_runs"]

log = logging.getLogger("providers.jobs")

HELD_RETRY_S = 5.0  # how often job ends held in memory (the disk was full) are written again

# (spec, run files) -> argv of the job's process group leader. No shell strings.
CommandBuilder = Callable[[JobSpec, RunFiles], list[str]]


class QueueFullError(RuntimeError):
    """Too many jobs are waiting: the service answers 429."""



def finite(value: Any) -> Any:
    """`value` with non-finite floats (a diverged loss) as None: JSON responses cannot carry NaN or inf."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def set_aside_unrecorded_checkpoints(spec: JobSpec, files: RunFiles) -> list[str]:
    """Rename checkpoint directories in the job's output dir that the job did not record writing (one cut
    short by a crash, or one planted there) so that resume never sees them: resuming unpickles optimizer,
    RNG and distributed-checkpoint state, so only checkpoints the job finished writing itself may load."""
    out = Path(spec.checkpoint.output_dir)
    if not out.is_dir():
        return []
    recorded = {c.get("path") for c in files.read_status().get("checkpoints", [])}
    moved = []
    for p in sorted(out.glob("checkpoint-*")):
        if str(p) not in recorded and re.fullmatch(r"checkpoint-\d+", p.name):
            aside = p.with_name(f"unrecorded-{p.name}-{int(time.time())}")
            os.rename(p, aside)
            moved.append(str(aside))
    if moved:
        log.warning("job %s: set aside checkpoints it did not record writing: %s", spec.job_uuid, moved)
    return moved


class JobManager:
    def __init__(
        self,
        store: JobStore,
        command: CommandBuilder,
        max_concurrent_jobs: int = 1,
        env: dict[str, str] | None = None,
        niceness: int | None = None,
        runs_dir: str | Path | None = None,
        max_queued_jobs: int = 100,
        launchers: dict[str, Launcher] | None = None,
        progress_timeout_s: float | None = None,
    ):
        self.store = store
        self.command = command
        self.max_concurrent_jobs = max_concurrent_jobs  # jobs on this host (`local`); schedulers keep their own queue
        self.max_queued_jobs = max_queued_jobs
        self.env = dict(env or {})
        # The service's limit (the ceiling of a pace-derived one, see progress_limit); a job's own wins.
        self.progress_timeout_s = int(progress_timeout_s or DEFAULT_PROGRESS_TIMEOUT_S)
        if progress_timeout_s is not None:
            self.env["TRL_PROGRESS_TIMEOUT_S"] = str(int(progress_timeout_s))
        self.runs_dir = Path(runs_dir).resolve() if runs_dir else None
        self.local = LocalLauncher(niceness)
        self.launchers: dict[str, Launcher] = {self.local.name: self.local, **(launchers or {})}
        self._running: dict[str, tuple[Launcher, str]] = {}  # job_uuid -> its launcher and id, while followed
        self._cancelled: dict[str, str | None] = {}  # job_uuid -> failure reason (None: a user's cancel)
        self._logged_as: dict[str, str] = {}  # job_uuid -> what the log calls a cancel ("paused")
        # What another part of the service knows of a failed job's cause, added to its error when it is
        # recorded (the nodes launcher: which node of a multi-node job stopped answering)
        self.failure_context: Callable[[str], str | None] | None = None
        # A job owner's limits (access.UserLimits, by the owner's name): the service's users; none here.
        self.limits_of: Callable[[str | None], access.UserLimits | None] = lambda owner: None
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._shutting_down = False
        # Jobs that were running when this process's predecessor stopped and that recovery failed: their
        # parts on other nodes (a multi-node job) must be stopped too (providers/launchers/nodes.py does).
        self.failed_at_start: list[str] = []
        # job_uuid -> (run dir, status.json fields) of a job end its status file could not take yet (the store's
        # part is held by the store); written by the held-ends thread.
        self._held_status: dict[str, tuple[str, dict[str, Any]]] = {}
        self._write_problem: str | None = None  # why the last held end could not be written
        self._job_timeouts: dict[str, int | None] = {}  # job_uuid -> its own scheduling.progress_timeout_s
        self._zygote_waited = False  # the first zygote's warm-up is over (see _zygote_warming)
        self._zygote_waiter: threading.Thread | None = None
        self._recover()
        threading.Thread(target=self._watch_progress, daemon=True, name="progress-watchdog").start()
        threading.Thread(target=self._write_held_ends, daemon=True, name="held-ends").start()

    # -- lifecycle ---------------------------------------------------------------------------------
    def _recover(self) -> None:
        """After a restart: jobs a scheduler runs (Slurm, Ray) are followed again by their external id;
        local jobs lost their supervisor, so what is left of them is stopped and they are marked failed.
        Queued jobs stay scheduled and run, unless their run dir or spec is gone. Run dirs without a record
        (a submission cut short) are removed. Nothing here may stop start-up."""
        for job in self.store.list(statuses=ACTIVE):
            external_id = job.external_id or (str(job.pid) if job.status == "in_progress" and job.pid else None)
            if external_id is None:
                if self.launchers.get(job.launcher) is self.local:  # started just before the server died?
                    self.local.stop_strays(RunFiles(job.run_dir))
                problem = self._unstartable(job)
                if problem:
                    self.fail(job.job_uuid, problem)
                continue
            launcher = self.launchers.get(job.launcher)
            files = RunFiles(job.run_dir)
            try:
                if launcher is None:
                    self.fail(job.job_uuid, f"the server restarted without the {job.launcher!r} launcher; the "
                                             f"job ({job.launcher} id {external_id}) may still run there")
                elif launcher.alive(external_id, files):
                    log.info("job %s: following %s job %s again", job.job_uuid, job.launcher, external_id)
                    self._follow(job.job_uuid, launcher, external_id)
                elif launcher is self.local and (ended := files.read_status()).get("state") in ("completed", "failed"):
                    # It ended while no server watched it: its status file says how (and why).
                    self.local.stop_orphan(external_id, files)
                    self._record_end(job.job_uuid, ended["state"], ended.get("error"), ended.get("finished_at"))
                    if ended["state"] == "failed":
                        self.failed_at_start.append(job.job_uuid)
                else:
                    if launcher is self.local:
                        self.local.stop_orphan(external_id, files)
                    full = no_space_left(self._job_dirs(job))  # its end may not have reached disk for that
                    self.fail(job.job_uuid, "the server restarted while the job was running" + (f" ({full})" if full else ""))
                    self.failed_at_start.append(job.job_uuid)
            except Exception as e:  # noqa: BLE001 - one job's recovery must not stop start-up
                log.exception("job %s: recovery failed", job.job_uuid)
                self.fail(job.job_uuid, f"the server restarted and could not follow the job: {type(e).__name__}: {e}")
        if self.runs_dir is not None and self.runs_dir.is_dir():
            for run_dir in self.runs_dir.iterdir():
                if run_dir.is_dir() and not self.store.exists(run_dir.name):
                    log.warning("removing %s: a submission that never completed (no job record)", run_dir)
                    shutil.rmtree(run_dir, ignore_errors=True)
        self._pump()

    @staticmethod
    def _unstartable(job: JobRecord) -> str | None:
        """Why a queued job cannot start (its run dir or spec is missing or unreadable), or None."""
        if not Path(job.run_dir).is_dir():
            return f"the job's run directory {job.run_dir} is missing"
        try:
            JobSpec.load(job.run_dir)
        except Exception as e:  # noqa: BLE001 - any unreadable spec
            return f"the job's spec cannot be read: {type(e).__name__}: {str(e)[:300]}"
        return None

    def fail(self, job_uuid: str, reason: str) -> None:
        """Mark a job failed with `reason`, in the store first (the source of truth), then its status file."""
        self._record_end(job_uuid, "failed", reason)
        log.warning("job %s failed: %s", job_uuid, reason)

    # -- job ends: on disk even when the disk is full, never waited for --------------------------------
    def _record_end(self, job_uuid: str, state: str, error: str | None, finished_at: str | None = None) -> None:
        """Record a job's end in the store (the source of truth), then in its status file. Readers see it at
        once; when the disk is full the store's reserved space is given up for it; what still cannot be
        written is held in memory (every read shows it, /health says degraded) and written by the held-ends
        thread as soon as it can be. Never blocks: start-up, a supervisor or a cancel never waits on a disk."""
        now = utc_now()
        try:
            run_dir = self.store.get(job_uuid).run_dir
        except UnknownJobError:
            return
        RunFiles(run_dir).drop_rank_reserves()  # those of killed ranks: space for what follows
        with self._lock:
            self.store.hold(job_uuid, status=state, error=error, completed_at=now)
            self._held_status[job_uuid] = (run_dir, {"state": state, "error": error, "finished_at": finished_at or now})
        problem, full = self._write_end(job_uuid)
        space = self.store.reserved_space
        if problem and full and space.release(f"job {job_uuid}'s end found the disk full"):
            log.warning("the disk of %s is full: gave up the %d MiB kept back there to record job %s's end; new "
                        "jobs wait until there is room for it again", space.path.parent, space.size >> 20, job_uuid)
            problem, full = self._write_end(job_uuid)
        if problem:
            log.error("job %s ended (%s: %s) but %s; its end is held in memory and written again every %.0f s",
                      job_uuid, state, error, problem, HELD_RETRY_S)

    def _write_end(self, job_uuid: str) -> tuple[str | None, bool]:
        """Write what is held of a job's end: (None, False) once all of it is on disk, else (why not, whether
        the disk is full)."""
        try:
            self.store.write_held(job_uuid)
        except StoreUnavailable as e:
            self._write_problem = str(e)
            return str(e), e.full
        with self._lock:
            run_dir, fields = self._held_status.get(job_uuid, (None, None))
        if fields is not None:
            try:
                if Path(run_dir).is_dir():
                    RunFiles(run_dir).update_status(**fields)
            except OSError as e:
                self._write_problem = f"its status file cannot be written: {e}"
                return self._write_problem, e.errno in (errno.ENOSPC, errno.EDQUOT)
            with self._lock:
                if self._held_status.get(job_uuid, (None, None))[1] is fields:
                    del self._held_status[job_uuid]
        return None, False

    def held_ends(self) -> list[str]:
        """Jobs whose end is held in memory, not yet on disk."""
        with self._lock:
            return sorted(set(self.store.held()) | set(self._held_status))

    def _write_held_ends(self) -> None:
        """Every HELD_RETRY_S: write the job ends held in memory; once the disk has room again, keep space back
        again and start what waits in the queue."""
        while not self._stopping.wait(HELD_RETRY_S):
            for job_uuid in self.held_ends():
                if self._write_end(job_uuid)[0] is None:
                    log.info("job %s: its end is on disk now", job_uuid)
            if self.store.reserved_space.released_because and not self.held_ends() and not self._disk_full():
                log.info("the disk of %s has room again: %d MiB kept back for job ends; queued jobs start",
                         self.store.reserved_space.path.parent, self.store.reserved_space.size >> 20)
                try:
                    self._pump()
                except StoreUnavailable as e:
                    log.error("queued jobs start once the store is available: %s", e)

    def _disk_full(self) -> str | None:
        """Why new work waits, or None: the data dir's disk has less free than the space kept back for job ends,
        or that space was given up and there is no room to take it again."""
        space = self.store.reserved_space
        if space.released_because is not None and not space.make():
            full = no_space_left([space.path.parent], min_free=2 * space.size) or "no room"
            return (f"{full}: the {space.size >> 20} MiB kept back there for job ends was given up "
                    f"({space.released_because}); new jobs are refused (507) and queued ones wait until "
                    f"{2 * space.size >> 20} MiB are free there")
        full = no_space_left([space.path.parent], min_free=space.size)
        if full:
            return f"{full}: new jobs are refused (507) and queued ones wait until {space.size >> 20} MiB are free there"
        return None

    def problems(self) -> list[str]:
        """What keeps this service from recording jobs as usual (none when healthy): /health shows them."""
        found = []
        held = self.held_ends()
        if held:
            found.append(f"{len(held)} job end(s) held in memory, not yet on disk ({', '.join(held[:10])}): "
                         f"{self._write_problem}; written again every {HELD_RETRY_S:.0f} s")
        full = self._disk_full()
        if full:
            found.append(full)
        return found

    def _refuse_new_work_when_disk_full(self) -> None:
        full = self._disk_full()
        if full:
            raise StoreUnavailable(f"job_uuid: not accepted now: {full}", full=True)

    def _watch_progress(self, interval_s: float = 2.0) -> None:
        """Fail a local job whose rank stopped making progress (no heartbeat for its progress timeout): a
        stopped, frozen or hung rank never exits by itself, and its peers would wait in a collective."""
        failing: set[str] = set()
        while not self._stopping.wait(interval_s):
            for job_uuid, (launcher, _) in list(self._running.items()):
                if launcher is not self.local or job_uuid in failing:
                    continue
                try:
                    files = RunFiles(self.store.get(job_uuid).run_dir)
                    timeout, basis = self.progress_limit(job_uuid, files)
                    stalled = files.stalled_rank(timeout)
                except Exception as e:  # noqa: BLE001 - the watchdog must outlive any one job's files
                    log.warning("job %s: progress check failed: %s", job_uuid, e)
                    continue
                if stalled:
                    rank, age = stalled
                    failing.add(job_uuid)
                    reason = (f"rank {rank} made no progress for {age} s (limit {timeout} s: {basis}); every "
                              "process of the job was stopped")
                    threading.Thread(target=self.cancel, args=(job_uuid, reason), daemon=True,
                                     name=f"watchdog-{job_uuid}").start()
            failing &= set(self._running)

    def progress_limit(self, job_uuid: str, files: RunFiles) -> tuple[int, str]:
        """(seconds, why) a rank of the job may go without a heartbeat (run_files.progress_limit)."""
        if job_uuid not in self._job_timeouts:
            self._job_timeouts[job_uuid] = JobSpec.load(files.dir).scheduling.progress_timeout_s
        return progress_limit(files, self._job_timeouts[job_uuid], self.progress_timeout_s)

    @contextmanager
    def reserve(self, job_uuid: str):
        """Reserve `job_uuid` and its run directory (an exclusive mkdir, so concurrent submissions of one id
        cannot both win), yield the directory, and remove it again if the block fails: a job's record and
        its run directory exist together or not at all."""
        with client_errors():
            check_name(job_uuid, "job_uuid")
        self._refuse_new_work_when_disk_full()
        if self.store.exists(job_uuid):
            raise DuplicateJobError(f"job_uuid: a job named {job_uuid!r} already exists")
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        run_dir = self.runs_dir / job_uuid
        try:
            run_dir.mkdir()
        except FileExistsError:
            raise DuplicateJobError(f"job_uuid: a job named {job_uuid!r} already exists") from None
        try:
            yield run_dir
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise

    def submit(self, spec: JobSpec, resources: dict[str, Any] | None = None, launcher: str = "local") -> JobRecord:
        """Write the job's spec and record it (the record last: it is what makes the job exist), then start
        it when a slot is free. Raises DuplicateJobError. Call inside `reserve`."""
        self._refuse_new_work_when_disk_full()
        if launcher not in self.launchers:
            raise BadRequest(f"training_config.torch_run_config.launcher: {launcher!r} is not enabled on this server "
                             f"(enabled: {sorted(self.launchers)})")
        scheduled = self.store.list(statuses=("scheduled",), everyone=True)
        if len(scheduled) >= self.max_queued_jobs:
            raise QueueFullError(f"job_uuid: {len(scheduled)} jobs are already queued (the limit is "
                                 f"{self.max_queued_jobs}); submit again when some have run")
        owner = access.owner_name()
        own_limit = (self.limits_of(owner) or access.UserLimits()).max_queued_jobs
        own_queued = sum(1 for j in scheduled if j.owner == owner)
        if own_limit is not None and own_queued >= own_limit:
            raise QueueFullError(f"job_uuid: user {owner!r} has {own_queued} jobs queued already (its limit, "
                                 f"max_queued_jobs, is {own_limit}); submit again when some have run")
        resources = dict(resources or {})
        if spec.not_applied:
            resources["not_applied"] = spec.not_applied
        if spec.result_name:
            resources["result_name"] = spec.result_name
        job = JobRecord(
            job_uuid=spec.job_uuid,
            method=spec.method,
            run_dir=spec.run_dir,
            scheduled_at=utc_now(),
            resources=resources,
            launcher=launcher,
            priority=spec.scheduling.priority,
            owner=owner,
        )
        spec.save()
        RunFiles(spec.run_dir).update_status(state="scheduled")
        self.store.create(job)
        self._pump()
        return job

    def _pump(self) -> None:
        """Start queued jobs, highest priority first: local ones while this host has a free slot, the others
        (a scheduler queues them) at once. A job that cannot start fails alone, with the reason: it never
        blocks the queue. Runs as the service (whichever user's request calls it: it starts everyone's jobs)."""
        with self._lock, access.acting_as(None):
            if self._shutting_down:  # a job stopped by the shutdown frees its slot: nothing new starts now
                return
            if self._disk_full():  # a new job would fill it again: queued jobs wait (the held-ends thread pumps)
                return
            running = self.local.running()
            by_owner: dict[str | None, int] = {}  # running jobs per user, for the users' max_concurrent_jobs
            for job in self.store.list(statuses=("in_progress",), everyone=True):
                by_owner[job.owner] = by_owner.get(job.owner, 0) + 1
            for job in self.store.list(statuses=("scheduled",), by_priority=True, everyone=True):
                if job.external_id is not None or job.job_uuid in self._running:
                    continue  # handed to its launcher already (pending in a scheduler's queue)
                if self._on_this_host(job) and running >= self.max_concurrent_jobs:
                    continue
                own_limit = (self.limits_of(job.owner) or access.UserLimits()).max_concurrent_jobs
                if own_limit is not None and by_owner.get(job.owner, 0) >= own_limit:
                    continue  # its owner runs as many as it may: the next user's job goes first
                if self.launchers.get(job.launcher) is self.local and self._zygote_warming():
                    continue  # it starts when the zygote is ready
                try:
                    problem = self._unstartable(job)
                    if problem:
                        self.fail(job.job_uuid, problem)
                        continue
                    self._start(job)
                    running += self._on_this_host(job)
                    by_owner[job.owner] = by_owner.get(job.owner, 0) + 1
                except Exception as e:  # noqa: BLE001 - one job's failure must not stop the queue
                    log.exception("job %s could not be started", job.job_uuid)
                    self.fail(job.job_uuid, f"the job could not be started: {type(e).__name__}: {str(e)[:300]}")

    def _zygote_warming(self) -> bool:
        """Whether this host's jobs wait for the zygote, which is importing the training stack: a job started
        now would import it a second time beside it (seconds of CPU each on a small host) and reach its first
        step no sooner. Only the first warm-up is waited for (a zygote that dies later is not: jobs then start
        as new processes); a thread starts the queue when the zygote is ready or has failed."""
        if self._zygote_waited:
            return False
        warming = zygote.warming(self.job_env())
        if warming is None:
            self._zygote_waited = True
            return False
        if self._zygote_waiter is None:
            def start_when_ready() -> None:
                warming.ready()
                self._zygote_waited = True
                self._pump()

            self._zygote_waiter = threading.Thread(target=start_when_ready, daemon=True, name="zygote-wait")
            self._zygote_waiter.start()
        return True

    def _on_this_host(self, job: JobRecord) -> bool:
        """Whether the job's processes run on this host (they take one of its max_concurrent_jobs slots)."""
        launcher = self.launchers.get(job.launcher)
        return launcher is not None and not launcher.runs_elsewhere

    def _start(self, job: JobRecord) -> None:
        launcher = self.launchers.get(job.launcher)
        if launcher is None:
            raise ValueError(f"launcher {job.launcher!r} is not enabled on this server")
        files = RunFiles(job.run_dir)
        files.logs.mkdir(exist_ok=True)
        spec = JobSpec.load(job.run_dir)
        if spec.checkpoint.resume:
            moved = set_aside_unrecorded_checkpoints(spec, files)
            if moved:
                files.update_status(unrecorded_checkpoints_set_aside=moved)
        request = LaunchRequest.of(spec, files, self.command(spec, files), self.job_env())
        files.mark_run_start(job.attempts + 1, job.launcher)
        external_id = launcher.submit(request)
        fields: dict[str, Any] = {"external_id": external_id, "attempts": job.attempts + 1}
        if launcher is self.local:
            fields.update(status="in_progress", started_at=utc_now(), pid=int(external_id))
        self.store.update(job.job_uuid, **fields)
        log.info("job %s started (%s %s): %s", job.job_uuid, job.launcher, external_id, " ".join(request.command))
        self._follow(job.job_uuid, launcher, external_id)

    def _follow(self, job_uuid: str, launcher: Launcher, external_id: str) -> None:
        with self._lock:
            self._running[job_uuid] = (launcher, external_id)
        threading.Thread(target=self._supervise, args=(job_uuid, launcher, external_id), daemon=True,
                         name=f"job-{job_uuid}").start()

    def job_env(self) -> dict[str, str]:
        """The environment of a job's processes: the server's without its settings and secrets (see
        child_env), plus the provider's job settings. PYTHONSAFEPATH keeps the working directory off
        sys.path, so no file in it can shadow a module."""
        return child_env(extra={**self.env, "PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1"})

    def _supervise(self, job_uuid: str, launcher: Launcher, external_id: str) -> None:
        files = RunFiles(self.store.get(job_uuid).run_dir)
        try:
            outcome = launcher.wait(external_id, files, lambda state: self._launch_state(job_uuid, state))
            self._record_exit(job_uuid, launcher, outcome)
        except Exception as e:  # noqa: BLE001 - the job must end in a final state, whatever happened
            log.exception("job %s: following it failed", job_uuid)
            self.fail(job_uuid, f"the job's end could not be recorded: {type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._running.pop(job_uuid, None)
            try:
                self._pump()
            except StoreUnavailable as e:
                log.error("job %s: queued jobs start once the store is available: %s", job_uuid, e)

    def _launch_state(self, job_uuid: str, state: LaunchState) -> None:
        """What the launcher says while the job is active: shown in resources_allocated; the job's status follows
        (ACTIVE_STATUS: running is in progress; pending, suspended and requeued are scheduled)."""
        job = self.store.get(job_uuid)
        if job.status not in ACTIVE:
            return
        resources = {**job.resources, "launcher_state": state.detail or state.state}
        resources.pop("launcher_reason", None)
        if state.reason:
            resources["launcher_reason"] = state.reason
        fields: dict[str, Any] = {"resources": resources}
        status = ACTIVE_STATUS.get(state.state, job.status)
        if status != job.status:
            fields["status"] = status
            if status == "in_progress":
                fields["started_at"] = utc_now()
        try:
            self.store.update(job_uuid, **fields)
        except StoreUnavailable as e:  # what the launcher says is shown again at its next change
            log.warning("job %s: its launcher state is not recorded: %s", job_uuid, e)

    def _record_exit(self, job_uuid: str, launcher: Launcher, outcome: LaunchState) -> None:
        job = self.store.get(job_uuid)
        if job.status not in ACTIVE:
            return  # already recorded (a cancel that gave up waiting)
        files = RunFiles(job.run_dir)
        status = files.read_status()
        first_rank_error = files.first_rank_error()
        if first_rank_error:
            status["error"] = first_rank_error
        cancelled = job_uuid in self._cancelled
        state, error = final_state(outcome, status, cancelled, self._cancelled.get(job_uuid), launcher.name)
        if state == "failed" and not cancelled and not status.get("error"):
            tail = files.tail_log(5)
            error = (error or "") + ("\n" + "\n".join(tail) if tail else "")
        if state == "failed" and not cancelled and "no space left" not in (error or "").lower():
            # The process could not say so itself when the disk was full (status.json unwritable).
            full = no_space_left(self._job_dirs(job))
            if full:
                error = f"{full}: {error}"
        if state == "failed" and not cancelled and self.failure_context is not None:
            try:
                context = self.failure_context(job_uuid)
            except Exception as e:  # noqa: BLE001 - the end is recorded whatever the context lookup does
                log.warning("job %s: looking up its failure's context failed: %s", job_uuid, e)
                context = None
            if context:
                error = f"{error}; {context}" if error else context
        if state == "failed" and not cancelled:
            try:
                if self._retry(job, error):
                    return
            except (StoreUnavailable, OSError) as e:  # a full disk: the failure is recorded, not retried
                log.error("job %s: cannot queue it again: %s", job_uuid, e)
        self._record_end(job_uuid, state, error, status.get("finished_at"))
        logged_as = self._logged_as.pop(job_uuid, "cancelled")
        log.info("job %s %s", job_uuid, logged_as if state == "cancelled" else state)

    @staticmethod
    def _job_dirs(job: JobRecord) -> list[str]:
        """The directories a job writes: its checkpoint dir, then its run dir."""
        try:
            return [JobSpec.load(job.run_dir).checkpoint.output_dir, job.run_dir]
        except Exception:  # noqa: BLE001 - an unreadable spec: the run dir alone
            return [job.run_dir]

    def _retry(self, job: JobRecord, error: str | None) -> bool:
        """Queue a failed job again if its spec allows another try; it resumes from its newest checkpoint."""
        try:
            max_retries = JobSpec.load(job.run_dir).scheduling.max_retries
        except Exception:  # noqa: BLE001 - an unreadable spec cannot run again
            return False
        retries = list(job.resources.get("retries", []))
        if len(retries) >= max_retries:
            return False
        retries.append({"attempt": job.attempts, "error": (error or "")[:2000], "failed_at": utc_now()})
        log.warning("job %s failed (attempt %d); trying again (%d of %d retries): %s", job.job_uuid, job.attempts,
                    len(retries), max_retries, (error or "")[:300])
        files = RunFiles(job.run_dir)
        shutil.rmtree(files.ranks, ignore_errors=True)  # the failed attempt's rank reports
        files.update_status(state="scheduled", error=None, last_attempt_error=error)
        self.store.update(job.job_uuid, status="scheduled", external_id=None, error=None,
                          resources={**job.resources, "retries": retries})
        return True

    def cancel(self, job_uuid: str, reason: str | None = None, logged_as: str = "cancelled") -> JobRecord:
        """Stop a job and every process it started: `cancelled` (the log says `logged_as`), or `failed` with
        `reason` when the job is stopped because something else failed. Cancelling a finished job changes nothing."""
        job = self.store.get(job_uuid)
        if job.status not in ACTIVE:
            return job
        with self._lock:
            self._logged_as[job_uuid] = logged_as
            # A second stop (a user's cancel while a failed node's part is stopped) keeps the first one's reason.
            reason = self._cancelled.setdefault(job_uuid, reason)
            followed = self._running.get(job_uuid)
            if followed is None:  # still queued here
                self._logged_as.pop(job_uuid, None)
                self._record_end(job_uuid, "failed" if reason else "cancelled", reason)
                return self.store.get(job_uuid)
        launcher, external_id = followed
        launcher.cancel(external_id)
        # The supervisor thread records the final state; wait for it so the caller sees it.
        deadline = time.monotonic() + 15
        while self.store.get(job_uuid).status in ACTIVE and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.store.get(job_uuid).status in ACTIVE:  # the launcher never confirmed: our record says it anyway
            self._record_end(job_uuid, "failed" if reason else "cancelled", reason)
        return self.store.get(job_uuid)

    def resume(self, job_uuid: str) -> JobRecord:
        """Run a failed or cancelled job again; training continues from its newest checkpoint."""
        job = self.store.get(job_uuid)
        if job.status not in ("failed", "cancelled"):
            raise BadRequest(f"job_uuid: job {job_uuid!r} is {job.status}; only failed or cancelled jobs resume")
        problem, full = self._write_end(job_uuid)  # its end first: the disk must take writes before it runs again
        if problem:
            raise StoreUnavailable(f"job_uuid: job {job_uuid!r} cannot resume now: {problem}", full=full)
        problem = self._unstartable(job)
        if problem:
            raise BadRequest(f"job_uuid: job {job_uuid!r} cannot resume: {problem}")
        with self._lock:
            self._cancelled.pop(job_uuid, None)
            self.store.update(job_uuid, status="scheduled", error=None, completed_at=None, external_id=None)
            files = RunFiles(job.run_dir)
            shutil.rmtree(files.ranks, ignore_errors=True)  # the previous attempt's rank reports
            files.update_status(state="scheduled", error=None)
        self._pump()
        return self.store.get(job_uuid)

    def shutdown(self) -> None:
        """Stop the jobs running on this host (they are marked failed on the next start if this process dies
        first), then fold the store's write-ahead log into it. Jobs a scheduler runs go on; the next
        start follows them again."""
        with self._lock:
            self._shutting_down = True
        for job_uuid, (launcher, external_id) in list(self._running.items()):
            if launcher is self.local:
                self._cancelled[job_uuid] = "the server shut down while the job was running"
                self.local.cancel(external_id)
        deadline = time.monotonic() + 10  # the supervisors record the ends they saw
        while any(l is self.local for l, _ in list(self._running.values())) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stopping.set()
        for job_uuid in self.held_ends():
            problem = self._write_end(job_uuid)[0]
            if problem:  # the next start records "the server restarted while the job was running"
                job = self.store.get(job_uuid)
                log.error("job %s: its end (%s: %s) is lost at this shutdown: %s", job_uuid, job.status, job.error,
                          problem)
        self.store.checkpoint()

    # -- views -------------------------------------------------------------------------------------
    def job_view(self, job_uuid: str) -> dict[str, Any]:
        """The store record merged with what the training process reported in its run dir."""
        job = self.store.get(job_uuid)
        status = RunFiles(job.run_dir).read_status()
        resources = dict(job.resources)
        resources.update(status.get("resources", {}))
        ranks = RunFiles(job.run_dir).rank_reports()
        if ranks:
            resources["ranks"] = ranks
        for key in ("step", "total_steps", "last_loss", "final_train_loss", "final_validation_loss"):
            if status.get(key) is not None:
                resources[key] = status[key]
        files = RunFiles(job.run_dir)
        logged = files.last_metrics(4096)  # status.json is rewritten at most once a second; the metrics every step
        if logged and isinstance(logged[-1].get("step"), int) and logged[-1]["step"] > resources.get("step", -1):
            resources["step"] = logged[-1]["step"]
        if job.status == "in_progress" and job.launcher == self.local.name:
            try:
                resources["progress_timeout_s"], resources["progress_timeout_from"] = self.progress_limit(job_uuid, files)
            except Exception as e:  # noqa: BLE001 - a status answer never fails for it
                log.warning("job %s: its progress limit is unknown: %s", job_uuid, e)
        if job.error:
            resources["error"] = job.error
        resources["launcher"] = job.launcher
        if job.external_id and job.launcher != self.local.name:  # a pgid means nothing to a client
            resources["external_id"] = job.external_id
        if job.attempts > 1:
            resources["attempts"] = job.attempts
        resources["run_dir"] = job.run_dir
        resources["log_file"] = str(RunFiles(job.run_dir).log)
        if job.owner is not None:
            resources["owner"] = job.owner
        return finite({
            "job_uuid": job.job_uuid,
            "status": job.status,
            "scheduled_at": job.scheduled_at,
            "started_at": job.started_at,
            "completed_at": job.completed_at,
            "resources_allocated": resources,
            "checkpoints": status.get("checkpoints", []),
        })

    def wait(self, job_uuid: str, timeout_s: float = 600) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.store.get(job_uuid).status
            if status not in ACTIVE:
                return status
            time.sleep(0.2)
        raise TimeoutError(f"job {job_uuid} still running after {timeout_s}s")
