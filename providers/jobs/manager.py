"""JobManager: queue, launch, supervise and cancel training processes; shared by both providers.

Each job runs as its own process group (the training entry point, or torchrun and its ranks), so the
server stays responsive and cancel can stop every process of a job with one signal.
"""

from __future__ import annotations

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

from ..errors import BadRequest, client_errors
from ..training.run_files import RunFiles, no_space_left, progress_timeout_s, utc_now
from ..launchers.base import RUNNING, Launcher, LaunchState, final_state
from ..launchers.local import LocalLauncher, kill_process_group, process_group_alive, process_group_runs
from ..training.spec import JobSpec, check_name
from .child_env import child_env
from .store import ACTIVE, DuplicateJobError, JobRecord, JobStore, StoreUnavailable, UnknownJobError
from .zygote import prestart

__all__ = ["JobManager", "QueueFullError", "kill_process_group", "process_group_alive", "process_group_runs"]

log = logging.getLogger("providers.jobs")

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
        prestart_zygote: bool = False,
        progress_timeout_s: float | None = None,
    ):
        self.store = store
        self.command = command
        self.max_concurrent_jobs = max_concurrent_jobs  # jobs on this host (`local`); schedulers keep their own queue
        self.max_queued_jobs = max_queued_jobs
        self.env = dict(env or {})
        if progress_timeout_s is not None:  # the service's default; a job's scheduling.progress_timeout_s wins
            self.env["TRL_PROGRESS_TIMEOUT_S"] = str(int(progress_timeout_s))
        self.runs_dir = Path(runs_dir).resolve() if runs_dir else None
        if niceness is None:
            import torch

            niceness = 0 if torch.cuda.is_available() else 10
        self.niceness = niceness
        self.local = LocalLauncher(niceness)
        self.launchers: dict[str, Launcher] = {self.local.name: self.local, **(launchers or {})}
        self._running: dict[str, tuple[Launcher, str]] = {}  # job_uuid -> its launcher and id, while followed
        self._cancelled: dict[str, str | None] = {}  # job_uuid -> failure reason (None: a user's cancel)
        # What another part of the service knows of a failed job's cause, added to its error when it is
        # recorded (the nodes launcher: which node of a multi-node job stopped answering)
        self.failure_context: Callable[[str], str | None] | None = None
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._shutting_down = False
        # Jobs that were running when this process's predecessor stopped and that recovery failed: their
        # parts on other nodes (a multi-node job) must be stopped too (providers/launchers/nodes.py does).
        self.failed_at_start: list[str] = []
        self._recover()
        threading.Thread(target=self._watch_progress, daemon=True, name="progress-watchdog").start()
        if prestart_zygote:  # a server: import the training stack now, so that its first job starts fast
            prestart(self.job_env())

    # -- lifecycle ---------------------------------------------------------------------------------
    def _recover(self) -> None:
        """After a restart: jobs a scheduler runs (Slurm, Ray) are followed again by their external id;
        local jobs lost their supervisor, so what is left of them is stopped and they are marked failed.
        Queued jobs stay scheduled and run, unless their run dir or spec is gone. Run dirs without a record
        (a submission cut short) are removed. Nothing here may stop start-up."""
        for job in self.store.list(statuses=ACTIVE):
            external_id = job.external_id or (str(job.pid) if job.status == "in_progress" and job.pid else None)
            if external_id is None:
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
                else:
                    if launcher is self.local:
                        self.local.stop_orphan(external_id, files)
                    self.fail(job.job_uuid, "the server restarted while the job was running")
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
        self._record_end(job_uuid, status="failed", error=reason, completed_at=utc_now())
        try:
            job = self.store.get(job_uuid)
            if Path(job.run_dir).is_dir():
                RunFiles(job.run_dir).update_status(state="failed", error=reason, finished_at=utc_now())
        except (OSError, UnknownJobError, StoreUnavailable) as e:
            log.warning("job %s: could not write its status file: %s", job_uuid, e)
        log.warning("job %s failed: %s", job_uuid, reason)

    def _record_end(self, job_uuid: str, **fields: Any) -> None:
        """Write a job's end to the store; while the store cannot take it (disk full, read-only), keep it in
        memory (job_view shows it) and try again every few seconds: a supervisor never dies of a write."""
        delay, held = 1.0, False
        while True:
            if held and not self.store.is_held(job_uuid):
                return  # written by another path (a resume writes it first)
            try:
                self.store.update(job_uuid, **fields)
                break
            except StoreUnavailable as e:
                if not held:
                    log.error("job %s ended (%s) but %s; retrying until it can be written", job_uuid,
                              fields.get("status"), e)
                    self.store.hold(job_uuid, **fields)
                    held = True
                if self._stopping.wait(delay):
                    return
                delay = min(delay * 2, 10.0)
        if held:
            self.store.release(job_uuid)
            log.info("job %s: its end (%s) is written to the store now", job_uuid, fields.get("status"))

    def _watch_progress(self, interval_s: float = 2.0) -> None:
        """Fail a local job whose rank stopped making progress (no heartbeat for its progress timeout): a
        stopped, frozen or hung rank never exits by itself, and its peers would wait in a collective."""
        failing: set[str] = set()
        while not self._stopping.wait(interval_s):
            for job_uuid, (launcher, _) in list(self._running.items()):
                if launcher is not self.local or job_uuid in failing:
                    continue
                try:
                    job = self.store.get(job_uuid)
                    timeout = progress_timeout_s(JobSpec.load(job.run_dir).scheduling.progress_timeout_s)
                    stalled = RunFiles(job.run_dir).stalled_rank(timeout)
                except Exception as e:  # noqa: BLE001 - the watchdog must outlive any one job's files
                    log.warning("job %s: progress check failed: %s", job_uuid, e)
                    continue
                if stalled:
                    rank, age = stalled
                    failing.add(job_uuid)
                    reason = (f"rank {rank} made no progress for {age} s (limit {timeout} s: "
                              "training_config.scheduling.progress_timeout_s or the service's --progress-timeout-s); "
                              "every process of the job was stopped")
                    threading.Thread(target=self.cancel, args=(job_uuid, reason), daemon=True,
                                     name=f"watchdog-{job_uuid}").start()
            failing &= set(self._running)

    @contextmanager
    def reserve(self, job_uuid: str):
        """Reserve `job_uuid` and its run directory (an exclusive mkdir, so concurrent submissions of one id
        cannot both win), yield the directory, and remove it again if the block fails: a job's record and
        its run directory exist together or not at all."""
        with client_errors():
            check_name(job_uuid, "job_uuid")
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
        if launcher not in self.launchers:
            raise BadRequest(f"training_config.torch_run_config.launcher: {launcher!r} is not enabled on this server "
                             f"(enabled: {sorted(self.launchers)})")
        queued = len(self.store.list(statuses=("scheduled",)))
        if queued >= self.max_queued_jobs:
            raise QueueFullError(f"job_uuid: {queued} jobs are already queued (the limit is {self.max_queued_jobs}); "
                                 "submit again when some have run")
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
        )
        spec.save()
        RunFiles(spec.run_dir).update_status(state="scheduled")
        self.store.create(job)
        self._pump()
        return job

    def _pump(self) -> None:
        """Start queued jobs, highest priority first: local ones while this host has a free slot, the others
        (a scheduler queues them) at once. A job that cannot start fails alone, with the reason: it never
        blocks the queue."""
        with self._lock:
            if self._shutting_down:  # a job stopped by the shutdown frees its slot: nothing new starts now
                return
            running = self.local.running()
            for job in self.store.list(statuses=("scheduled",), by_priority=True):
                if job.external_id is not None or job.job_uuid in self._running:
                    continue  # handed to its launcher already (pending in a scheduler's queue)
                if self._on_this_host(job) and running >= self.max_concurrent_jobs:
                    continue
                try:
                    problem = self._unstartable(job)
                    if problem:
                        self.fail(job.job_uuid, problem)
                        continue
                    self._start(job)
                    running += self._on_this_host(job)
                except Exception as e:  # noqa: BLE001 - one job's failure must not stop the queue
                    log.exception("job %s could not be started", job.job_uuid)
                    self.fail(job.job_uuid, f"the job could not be started: {type(e).__name__}: {str(e)[:300]}")

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
        argv = self.command(spec, files)
        files.mark_run_start(job.attempts + 1, job.launcher)
        external_id = launcher.submit(job.job_uuid, spec, files, argv, self.job_env())
        fields: dict[str, Any] = {"external_id": external_id, "attempts": job.attempts + 1}
        if launcher is self.local:
            fields.update(status="in_progress", started_at=utc_now(), pid=int(external_id))
        self.store.update(job.job_uuid, **fields)
        log.info("job %s started (%s %s): %s", job.job_uuid, job.launcher, external_id, " ".join(argv))
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
        """What the launcher says while the job is active: shown in resources_allocated; running means the
        job is in progress."""
        job = self.store.get(job_uuid)
        if job.status not in ACTIVE:
            return
        resources = {**job.resources, "launcher_state": state.detail or state.state}
        resources.pop("launcher_reason", None)
        if state.reason:
            resources["launcher_reason"] = state.reason
        fields: dict[str, Any] = {"resources": resources}
        if state.state == RUNNING and job.status == "scheduled":
            fields.update(status="in_progress", started_at=utc_now())
        self.store.update(job_uuid, **fields)

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
        if state == "failed" and not cancelled and self._retry(job, error):
            return
        self._record_end(job_uuid, status=state, error=error, completed_at=utc_now())
        if files.dir.is_dir():
            try:
                files.update_status(state=state, error=error, finished_at=status.get("finished_at") or utc_now())
            except OSError as e:  # the store has it; the status file catches up on the next write
                log.warning("job %s: could not write its status file: %s", job_uuid, e)
        log.info("job %s %s", job_uuid, state)

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

    def cancel(self, job_uuid: str, reason: str | None = None) -> JobRecord:
        """Stop a job and every process it started: `cancelled`, or `failed` with `reason` when the job is
        stopped because something else failed. Cancelling a finished job changes nothing."""
        job = self.store.get(job_uuid)
        if job.status not in ACTIVE:
            return job
        with self._lock:
            # A second stop (a user's cancel while a failed node's part is stopped) keeps the first one's reason.
            reason = self._cancelled.setdefault(job_uuid, reason)
            followed = self._running.get(job_uuid)
            if followed is None:  # still queued here
                state = "failed" if reason else "cancelled"
                self.store.update(job_uuid, status=state, error=reason, completed_at=utc_now())
                if Path(job.run_dir).is_dir():
                    RunFiles(job.run_dir).update_status(state=state, error=reason)
                return self.store.get(job_uuid)
        launcher, external_id = followed
        launcher.cancel(external_id)
        # The supervisor thread records the final state; wait for it so the caller sees it.
        deadline = time.monotonic() + 15
        while self.store.get(job_uuid).status in ACTIVE and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.store.get(job_uuid).status in ACTIVE:  # the launcher never confirmed: our record says it anyway
            state = "failed" if reason else "cancelled"
            self.store.update(job_uuid, status=state, error=reason, completed_at=utc_now())
            RunFiles(job.run_dir).update_status(state=state, error=reason, finished_at=utc_now())
        return self.store.get(job_uuid)

    def resume(self, job_uuid: str) -> JobRecord:
        """Run a failed or cancelled job again; training continues from its newest checkpoint."""
        job = self.store.get(job_uuid)
        if job.status not in ("failed", "cancelled"):
            raise BadRequest(f"job_uuid: job {job_uuid!r} is {job.status}; only failed or cancelled jobs resume")
        self.store.write_held(job_uuid)  # its end first: the database must take writes before it can run again
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
        if job.error:
            resources["error"] = job.error
        resources["launcher"] = job.launcher
        if job.external_id and job.launcher != self.local.name:  # a pgid means nothing to a client
            resources["external_id"] = job.external_id
        if job.attempts > 1:
            resources["attempts"] = job.attempts
        resources["run_dir"] = job.run_dir
        resources["log_file"] = str(RunFiles(job.run_dir).log)
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
