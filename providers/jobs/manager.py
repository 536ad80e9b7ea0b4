"""JobManager: queue, launch, supervise and cancel training processes; shared by both providers.

Each job runs as its own process group (the training entry point, or torchrun and its ranks), so the
server stays responsive and cancel can stop every process of a job with one signal.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..training.run_files import RunFiles, utc_now
from ..training.spec import JobSpec
from .store import ACTIVE, JobRecord, JobStore

log = logging.getLogger("providers.jobs")

# (spec, run files) -> argv of the job's process group leader. No shell strings.
CommandBuilder = Callable[[JobSpec, RunFiles], list[str]]


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


class JobManager:
    def __init__(
        self,
        store: JobStore,
        command: CommandBuilder,
        max_concurrent_jobs: int = 1,
        env: dict[str, str] | None = None,
        niceness: int | None = None,
    ):
        self.store = store
        self.command = command
        self.max_concurrent_jobs = max_concurrent_jobs
        self.env = env or {}
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
        mark them failed. Jobs still waiting in the queue stay scheduled and will run."""
        for job in self.store.list(statuses=("in_progress",)):
            if job.pid and process_group_runs(job.pid, job.run_dir):
                kill_process_group(job.pid)
            reason = "the server restarted while the job was running"
            RunFiles(job.run_dir).update_status(state="failed", error=reason, finished_at=utc_now())
            self.store.update(job.job_uuid, status="failed", error=reason, completed_at=utc_now())
        self._pump()

    def submit(self, spec: JobSpec, resources: dict[str, Any] | None = None) -> JobRecord:
        """Record the job (raises DuplicateJobError), write its spec, and start it when a slot is free."""
        job = JobRecord(
            job_uuid=spec.job_uuid,
            method=spec.method,
            run_dir=spec.run_dir,
            scheduled_at=utc_now(),
            resources=resources or {},
        )
        self.store.create(job)
        spec.save()
        RunFiles(spec.run_dir).update_status(state="scheduled")
        self._pump()
        return job

    def _pump(self) -> None:
        with self._lock:
            running = sum(1 for p in self._procs.values() if p.poll() is None)
            for job in self.store.list(statuses=("scheduled",)):
                if running >= self.max_concurrent_jobs:
                    break
                self._start(job)
                running += 1

    def _start(self, job: JobRecord) -> None:
        files = RunFiles(job.run_dir)
        files.logs.mkdir(parents=True, exist_ok=True)
        spec = JobSpec.load(job.run_dir)
        argv = self.command(spec, files)
        with open(files.log, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: cancel signals the whole tree
                preexec_fn=self._lower_priority,
                env={**os.environ, **self.env, "PYTHONUNBUFFERED": "1"},
                cwd=job.run_dir,
            )
        self._procs[job.job_uuid] = proc
        self.store.update(job.job_uuid, status="in_progress", started_at=utc_now(), pid=proc.pid)
        log.info("job %s started: pid %d: %s", job.job_uuid, proc.pid, " ".join(argv))
        threading.Thread(target=self._supervise, args=(job.job_uuid, proc), daemon=True).start()

    def _lower_priority(self) -> None:
        # On a CPU-only host the job's processes compete with the server for cores: a lower priority
        # keeps status polls and cancels quick without slowing training when cores are free.
        if self.niceness:
            os.nice(self.niceness)

    def _supervise(self, job_uuid: str, proc: subprocess.Popen) -> None:
        code = proc.wait()
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
        files.update_status(state=state, error=error, finished_at=status.get("finished_at") or utc_now())
        self.store.update(job_uuid, status=state, error=error, completed_at=utc_now())
        with self._lock:
            self._procs.pop(job_uuid, None)
        log.info("job %s %s", job_uuid, state)
        self._pump()

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
        return {
            "job_uuid": job.job_uuid,
            "status": job.status,
            "scheduled_at": job.scheduled_at,
            "started_at": job.started_at,
            "completed_at": job.completed_at,
            "resources_allocated": resources,
            "checkpoints": status.get("checkpoints", []),
        }

    def wait(self, job_uuid: str, timeout_s: float = 600) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.store.get(job_uuid).status
            if status not in ACTIVE:
                return status
            time.sleep(0.2)
        raise TimeoutError(f"job {job_uuid} still running after {timeout_s}s")
