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
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..training.run_files import RunFiles, utc_now
from ..training.spec import SAFE_NAME, JobSpec
from .store import ACTIVE, DuplicateJobError, JobRecord, JobStore, UnknownJobError
from .zygote import launch_job_process

log = logging.getLogger("providers.jobs")

# (spec, run files) -> argv of the job's process group leader. No shell strings.
CommandBuilder = Callable[[JobSpec, RunFiles], list[str]]
SAFE_NAME_RE = re.compile(SAFE_NAME)


class QueueFullError(RuntimeError):
    """Too many jobs are waiting: the service answers 429."""

# The server's own settings and secrets never reach a job's processes.
SERVER_ENV_PREFIXES = ("TRL_FSDP_",)


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def kill_process_group(pgid: int, grace_s: float = 5.0) -> None:
    """SIGTERM the group, then SIGKILL whatever is left after `grace_s`."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and process_group_alive(pgid):
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def process_group_runs(pgid: int, run_dir: str) -> bool:
    """Whether process group `pgid` still holds a process of the job in `run_dir` (its command line names
    the run dir). After a reboot a recorded pid may belong to an unrelated process group, which must not
    be signalled. Where /proc is missing the group is assumed to be the job's."""
    if not process_group_alive(pgid):
        return False
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    needle = str(run_dir).encode()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # /proc/PID/stat: "pid (comm) state ppid pgrp ..."; comm may contain spaces and parentheses.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid or fields[0] == "Z":
                continue
            if needle in (entry / "cmdline").read_bytes():
                return True
        except (OSError, IndexError, ValueError):
            continue
    return False


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
    ):
        self.store = store
        self.command = command
        self.max_concurrent_jobs = max_concurrent_jobs
        self.max_queued_jobs = max_queued_jobs
        self.env = env or {}
        self.runs_dir = Path(runs_dir).resolve() if runs_dir else None
        if niceness is None:
            import torch

            niceness = 0 if torch.cuda.is_available() else 10
        self.niceness = niceness
        self._procs: dict[str, subprocess.Popen] = {}
        self._cancelled: dict[str, str | None] = {}  # job_uuid -> failure reason (None: a user's cancel)
        self._lock = threading.RLock()
        self._recover()

    # -- lifecycle ---------------------------------------------------------------------------------
    def _recover(self) -> None:
        """After a restart: jobs that were running lost their supervisor; stop what is left of them and
        mark them failed. Queued jobs stay scheduled and run, unless their run dir or spec is gone. Run
        dirs without a record (a submission cut short) are removed. Nothing here may stop start-up."""
        for job in self.store.list(statuses=("in_progress",)):
            try:
                if job.pid and process_group_runs(job.pid, job.run_dir):
                    kill_process_group(job.pid)
            except OSError as e:
                log.warning("job %s: could not stop its old processes: %s", job.job_uuid, e)
            self._fail(job.job_uuid, "the server restarted while the job was running")
        for job in self.store.list(statuses=("scheduled",)):
            problem = self._unstartable(job)
            if problem:
                self._fail(job.job_uuid, problem)
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

    def _fail(self, job_uuid: str, reason: str) -> None:
        """Mark a job failed with `reason`, in the store first (the source of truth), then its status file."""
        self.store.update(job_uuid, status="failed", error=reason, completed_at=utc_now())
        try:
            job = self.store.get(job_uuid)
            if Path(job.run_dir).is_dir():
                RunFiles(job.run_dir).update_status(state="failed", error=reason, finished_at=utc_now())
        except (OSError, UnknownJobError) as e:
            log.warning("job %s: could not write its status file: %s", job_uuid, e)
        log.warning("job %s failed: %s", job_uuid, reason)

    @contextmanager
    def reserve(self, job_uuid: str):
        """Reserve `job_uuid` and its run directory (an exclusive mkdir, so concurrent submissions of one id
        cannot both win), yield the directory, and remove it again if the block fails: a job's record and
        its run directory exist together or not at all."""
        if not isinstance(job_uuid, str) or not SAFE_NAME_RE.match(job_uuid):
            raise ValueError(f"job_uuid: {str(job_uuid)[:200]!r} must be 1-128 letters, digits, '.', '_' or '-', "
                             "not starting with '.'")
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

    def submit(self, spec: JobSpec, resources: dict[str, Any] | None = None) -> JobRecord:
        """Write the job's spec and record it (the record last: it is what makes the job exist), then start
        it when a slot is free. Raises DuplicateJobError. Call inside `reserve`."""
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
        )
        spec.save()
        RunFiles(spec.run_dir).update_status(state="scheduled")
        self.store.create(job)
        self._pump()
        return job

    def _pump(self) -> None:
        """Start queued jobs while slots are free. A job that cannot start fails alone, with the reason:
        it never blocks the queue."""
        with self._lock:
            running = sum(1 for p in self._procs.values() if p.poll() is None)
            for job in self.store.list(statuses=("scheduled",)):
                if running >= self.max_concurrent_jobs:
                    break
                try:
                    problem = self._unstartable(job)
                    if problem:
                        self._fail(job.job_uuid, problem)
                        continue
                    self._start(job)
                    running += 1
                except Exception as e:  # noqa: BLE001 - one job's failure must not stop the queue
                    log.exception("job %s could not be started", job.job_uuid)
                    self._fail(job.job_uuid, f"the job could not be started: {type(e).__name__}: {str(e)[:300]}")

    def _start(self, job: JobRecord) -> None:
        files = RunFiles(job.run_dir)
        files.logs.mkdir(exist_ok=True)
        spec = JobSpec.load(job.run_dir)
        if spec.checkpoint.resume:
            moved = set_aside_unrecorded_checkpoints(spec, files)
            if moved:
                files.update_status(unrecorded_checkpoints_set_aside=moved)
        argv = self.command(spec, files)
        proc = self._launch(argv, files, job.run_dir)
        self._procs[job.job_uuid] = proc
        self.store.update(job.job_uuid, status="in_progress", started_at=utc_now(), pid=proc.pid)
        log.info("job %s started: pid %d: %s", job.job_uuid, proc.pid, " ".join(argv))
        threading.Thread(target=self._supervise, args=(job.job_uuid, proc), daemon=True).start()

    def job_env(self) -> dict[str, str]:
        """The environment of a job's processes: the server's, without its secrets and settings
        (TRL_FSDP_*: the API token among them), plus the provider's job settings. PYTHONSAFEPATH keeps the
        working directory off sys.path, so no file in it can shadow a module."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(SERVER_ENV_PREFIXES)}
        return {**env, **self.env, "PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1"}

    def _launch(self, argv: list[str], files: RunFiles, run_dir: str) -> subprocess.Popen:
        with open(files.log, "ab") as out:
            # Forked from the preloaded zygote when it can (the same session, env, cwd and log), else Popen.
            return launch_job_process(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: cancel signals the whole tree
                preexec_fn=self._lower_priority,
                env=self.job_env(),
                cwd=run_dir,
                niceness=self.niceness,
            )

    def _lower_priority(self) -> None:
        # On a CPU-only host the job's processes compete with the server for cores: a lower priority
        # keeps status polls and cancels quick without slowing training when cores are free.
        if self.niceness:
            os.nice(self.niceness)

    def _supervise(self, job_uuid: str, proc: subprocess.Popen) -> None:
        code = proc.wait()
        try:
            self._record_exit(job_uuid, proc, code)
        except Exception as e:  # noqa: BLE001 - the job must end in a final state, whatever happened
            log.exception("job %s: recording its end failed", job_uuid)
            self._fail(job_uuid, f"training process exited with code {code}; its end could not be recorded: {e}")
        finally:
            with self._lock:
                self._procs.pop(job_uuid, None)
            self._pump()

    def _record_exit(self, job_uuid: str, proc: subprocess.Popen, code: int) -> None:
        job = self.store.get(job_uuid)
        files = RunFiles(job.run_dir)
        # Ranks of a failed torchrun job may linger; nothing of the job may outlive it.
        if process_group_alive(proc.pid):
            kill_process_group(proc.pid, grace_s=2.0)
        status = files.read_status()
        first_rank_error = files.first_rank_error()
        if first_rank_error:
            status["error"] = first_rank_error
        if job_uuid in self._cancelled:
            reason = self._cancelled[job_uuid]
            state, error = ("failed", reason) if reason else ("cancelled", None)
        elif code == 0 and status.get("state") == "completed":
            state, error = "completed", None
        else:
            error = status.get("error") or f"training process exited with code {code}"
            tail = files.tail_log(5)
            state, error = "failed", error + ("\n" + "\n".join(tail) if tail and not status.get("error") else "")
        self.store.update(job_uuid, status=state, error=error, completed_at=utc_now())
        if files.dir.is_dir():
            files.update_status(state=state, error=error, finished_at=status.get("finished_at") or utc_now())
        log.info("job %s %s", job_uuid, state)

    def cancel(self, job_uuid: str, reason: str | None = None) -> JobRecord:
        """Stop a job and every process it started: `cancelled`, or `failed` with `reason` when the job is
        stopped because something else failed. Cancelling a finished job changes nothing."""
        job = self.store.get(job_uuid)
        if job.status not in ACTIVE:
            return job
        with self._lock:
            self._cancelled[job_uuid] = reason
            proc = self._procs.get(job_uuid)
            if proc is None:  # still queued
                state = "failed" if reason else "cancelled"
                self.store.update(job_uuid, status=state, error=reason, completed_at=utc_now())
                if Path(job.run_dir).is_dir():
                    RunFiles(job.run_dir).update_status(state=state, error=reason)
                return self.store.get(job_uuid)
        kill_process_group(proc.pid)
        proc.wait()
        # The supervisor thread records the final state; wait for it so the caller sees it.
        deadline = time.monotonic() + 10
        while self.store.get(job_uuid).status in ACTIVE and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.store.get(job_uuid)

    def resume(self, job_uuid: str) -> JobRecord:
        """Run a failed or cancelled job again; training continues from its newest checkpoint."""
        job = self.store.get(job_uuid)
        if job.status not in ("failed", "cancelled"):
            raise ValueError(f"job_uuid: job {job_uuid!r} is {job.status}; only failed or cancelled jobs resume")
        problem = self._unstartable(job)
        if problem:
            raise ValueError(f"job_uuid: job {job_uuid!r} cannot resume: {problem}")
        with self._lock:
            self._cancelled.pop(job_uuid, None)
            self.store.update(job_uuid, status="scheduled", error=None, completed_at=None)
            files = RunFiles(job.run_dir)
            shutil.rmtree(files.ranks, ignore_errors=True)  # the previous attempt's rank reports
            files.update_status(state="scheduled", error=None)
        self._pump()
        return self.store.get(job_uuid)

    def shutdown(self) -> None:
        """Stop running jobs (they are marked failed on the next start if this process dies first)."""
        for job_uuid, proc in list(self._procs.items()):
            if proc.poll() is None:
                self._cancelled[job_uuid] = "the server shut down while the job was running"
                kill_process_group(proc.pid)

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
