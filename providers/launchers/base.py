"""Launchers: how a job's processes are started, followed and stopped.

The JobManager owns the queue and the job records; a launcher only knows how to start the training entry
point somewhere and what the place it started it says about it. `local` starts it on this host (forked
from the preloaded zygote, or spawned); the service adds `slurm`, `ray` and `nodes` (the registry in
providers/launchers/__init__.py). Each job records its launcher's name and the external id the
launcher returned, so a restarted server re-attaches to jobs that outlived it.

The JobManager describes each launch as data (`LaunchRequest`: the entry point module, its run dir, nodes and
processes per node, resources, priority, environment); each launcher turns it into its own command (a process
group here, an sbatch script, a Ray job, a pod spec) with its own interpreter or image, its own names
(`dns_name`) and, where the job's hosts mount the shared volume elsewhere, the config's path map.

One owner of retries: the JobManager (scheduling.max_retries; the next attempt resumes from the newest
checkpoint the job recorded). Launchers ask their schedulers for none (sbatch --no-requeue; a Ray job and its
actors restart nothing; a Kubernetes job: backoffLimit 0, restartPolicy Never). What a scheduler still does
by its operator's policy is no retry of a failure: a job it suspends or puts back in its queue stays active
(`suspended`, `requeued`) and keeps its attempts.

Callers ask the launcher instead of comparing names: `runs_elsewhere` (a scheduler places the job's
processes on other hosts, so this host's hardware says nothing about them), `unhonoured(spec)` (settings
it cannot apply, recorded in the spec's not_applied) and `check(...)` (what can be refused before the job
starts; a node checks the rest itself when the job loads, providers/training/components.py).

Truth comes from both sides: what the launcher reports (`LaunchState`) and what the trainer wrote in
RUN_DIR/status.json. `final_state` joins them in one table.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..training.run_files import RunFiles
from ..training.spec import FsdpSpec, JobSpec, ResourceRequest, SchedulingSpec

# Launcher states: pending, running, suspended and requeued are active; the rest are final.
PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED, UNKNOWN = "pending", "running", "succeeded", "failed", "cancelled", "unknown"
SUSPENDED = "suspended"  # the scheduler stopped the job's processes and keeps its place (Slurm SUSPENDED, Kueue)
REQUEUED = "requeued"  # the scheduler ended this run of the processes and will start them again (preemption)
LAUNCH_FINAL = (SUCCEEDED, FAILED, CANCELLED, UNKNOWN)
# The job's status while its launcher is in an active state: only running processes are `in_progress`.
ACTIVE_STATUS = {PENDING: "scheduled", RUNNING: "in_progress", SUSPENDED: "scheduled", REQUEUED: "scheduled"}

ENTRY_POINT = "providers.training.run"  # `python -m ENTRY_POINT RUN_DIR`: what every launcher runs on each rank


def dns_name(job_uuid: str, prefix: str = "trl", max_len: int = 63) -> str:
    """A DNS-1123 label for the job's objects (a Kubernetes TrainJob, a Slurm job name, a Ray submission id):
    `trl-` and the id in lowercase letters, digits and '-'. Where that changed or shortened the id, 8 hex
    digits of its SHA-256 follow, so different ids never share a name."""
    body = re.sub(r"[^a-z0-9]+", "-", job_uuid.lower()).strip("-")
    name = f"{prefix}-{body}".rstrip("-")
    if name != f"{prefix}-{job_uuid}" or len(name) > max_len:
        digest = hashlib.sha256(job_uuid.encode()).hexdigest()[:8]
        name = f"{name[:max_len - 9].rstrip('-')}-{digest}"
    return name


@dataclass(frozen=True)
class LaunchRequest:
    """A job's launch as data, built by the JobManager; each launcher turns it into its own command.

    The ranks run `python -m {module} {run dir}`: a launcher supplies the interpreter (or image) and maps the
    run dir to its hosts' mount of the shared volume. `command` is this host's command for it (torchrun or
    the forked ranks), which only launchers that start processes here (`local`) run."""

    job_uuid: str
    files: RunFiles  # the run dir as this host sees it
    scheduling: SchedulingSpec  # priority and each node's resources (max_retries is the JobManager's)
    env: dict[str, str]  # the job's environment (the service's secrets removed): each launcher passes what it may
    command: list[str] = field(default_factory=list)
    nnodes: int = 1
    nproc_per_node: int = 1
    rdzv_timeout_s: int = 60
    module: str = ENTRY_POINT

    @classmethod
    def of(cls, spec: JobSpec, files: RunFiles, command: list[str], env: dict[str, str]) -> LaunchRequest:
        """The request for a job whose spec and torchrun options (RUN_DIR/torchrun.json, if any) are written."""
        try:
            torch_run = json.loads((files.dir / "torchrun.json").read_text())
        except FileNotFoundError:  # the inline provider: one process
            torch_run = {}
        return cls(job_uuid=spec.job_uuid, files=files, scheduling=spec.scheduling, env=env, command=command,
                   nnodes=torch_run.get("nnodes", 1), nproc_per_node=torch_run.get("nproc_per_node", 1),
                   rdzv_timeout_s=torch_run.get("rdzv_timeout_s", 60))

    @property
    def name(self) -> str:
        """What a launcher names the job's objects (a DNS-1123 label)."""
        return dns_name(self.job_uuid)


@dataclass
class LaunchState:
    """What a launcher says about a job: `state` (one of the constants above), the launcher's own state
    name and reason (Slurm's `PENDING`/`Resources`, Ray's `FAILED`/its message), and an exit code."""

    state: str
    detail: str | None = None  # the launcher's own state name
    reason: str | None = None
    exit_code: int | None = None
    failed_node: str | None = None  # where a failed job failed, as the launcher saw it: "node vm2 (node rank 1, rank 1)"

    @property
    def final(self) -> bool:
        return self.state in LAUNCH_FINAL


class LauncherUnavailable(RuntimeError):
    """An enabled launcher cannot work on this host (its commands are missing): the service does not start."""


def check_mesh(fsdp: FsdpSpec | None, torch_run) -> None:
    """Refuse an FSDP mesh that the job's world cannot form (it does not depend on any host)."""
    if fsdp is not None:
        from ..errors import client_errors
        from ..training.spec import mesh_shape

        with client_errors():  # the core's message names the fsdp_config field
            mesh_shape(fsdp, torch_run.nproc_per_node * torch_run.nnodes, torch_run.nproc_per_node)


class Launcher(Protocol):
    name: str
    runs_elsewhere: bool  # the job's processes run on hosts a scheduler picks, not on this API host

    def check(self, torch_run, fsdp: FsdpSpec | None, resources: ResourceRequest) -> None:
        """Raise ValueError (naming the field) for what the job's hosts cannot run, before anything starts.
        Launchers that run elsewhere check only what does not depend on this host."""

    def unhonoured(self, spec: JobSpec) -> dict[str, str]:
        """Settings of `spec` this launcher has no way to apply: field -> why."""

    def submit(self, request: LaunchRequest) -> str:
        """Start the job its own way (a process group, an sbatch script, a Ray job, a TrainJob); returns the
        launcher's id of it. The scheduler is asked for no retries: the JobManager owns them."""

    def poll(self, external_id: str, files: RunFiles) -> LaunchState: ...

    def logs(self, external_id: str, files: RunFiles, limit_bytes: int = 64 * 1024) -> str:
        """The last `limit_bytes` of the job's output as the launcher has it (the job's log, the Ray driver's,
        a pod's): what a user reads when the run dir says nothing (a job that never started)."""

    def wait(self, external_id: str, files: RunFiles, on_change: Callable[[LaunchState], None]) -> LaunchState:
        """Block until the job is final; call `on_change` whenever the launcher's state changes."""

    def cancel(self, external_id: str) -> None:
        """Stop every process of the job; returns once the launcher has been told (wait() sees the end)."""

    def alive(self, external_id: str, files: RunFiles) -> bool:
        """Whether a job recorded before a restart can be followed again (re-attached)."""


def poll_until_final(launcher: Launcher, external_id: str, files: RunFiles, on_change: Callable[[LaunchState], None],
                     poll_s: float, stop: threading.Event | None = None) -> LaunchState:
    """`wait` for launchers that can only be polled."""
    last = None
    while True:
        state = launcher.poll(external_id, files)
        if (state.state, state.detail, state.reason) != last:
            last = (state.state, state.detail, state.reason)
            on_change(state)
        if state.final:
            return state
        if stop is not None and stop.wait(poll_s):
            return state
        if stop is None:
            time.sleep(poll_s)


def log_tail(path, limit_bytes: int) -> str:
    """The last `limit_bytes` of a log file ('' when it is missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - limit_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


class LastKnownStates:
    """What a polled scheduler last said about each job, so that a scheduler that does not answer (a
    controller or head restarting, a network blip) is not taken for the job's end: the job keeps its last
    state until `who` has been unreachable for `give_up_s`; then it is unknown and status.json decides."""

    def __init__(self, who: str, give_up_s: float = 600.0):
        self.who = who
        self.give_up_s = give_up_s
        self._lock = threading.Lock()
        self._last: dict[str, LaunchState] = {}
        self._silent_since: dict[str, float] = {}

    def answered(self, external_id: str, state: LaunchState) -> LaunchState:
        with self._lock:
            self._silent_since.pop(external_id, None)
            if state.final:
                self._last.pop(external_id, None)
            else:
                self._last[external_id] = state
        return state

    def unreachable(self, external_id: str, why: str) -> LaunchState:
        with self._lock:
            since = self._silent_since.setdefault(external_id, time.monotonic())
            last = self._last.get(external_id, LaunchState(PENDING))
        if time.monotonic() - since > self.give_up_s:
            return LaunchState(UNKNOWN, reason=f"{self.who} was unreachable for {self.give_up_s:.0f} s ({why})")
        return LaunchState(last.state, detail=last.detail, reason=f"{self.who} is unreachable: {why}")


def final_state(launch: LaunchState, status: dict, cancelled: bool, cancel_reason: str | None,
                launcher: str) -> tuple[str, str | None]:
    """The job's final (state, error) from the launcher's final state and the trainer's status.json.

    | what happened                                   | job state | error                          |
    |-------------------------------------------------|-----------|--------------------------------|
    | cancelled through our API                        | cancelled | -                              |
    | stopped by us because something else failed      | failed    | that reason                    |
    | launcher: succeeded, status.json: completed      | completed | -                              |
    | launcher: succeeded, status.json: anything else  | failed    | the launcher said success, ... |
    | launcher: cancelled (scancel, ray job stop)      | cancelled | who cancelled it               |
    | launcher: failed (exit code, TIMEOUT, NODE_FAIL) | failed    | the failed node (if known), then the trainer's error, else the launcher's reason |
    | launcher: unknown (forgot the job)               | status.json's final state, else failed |

    While the launcher's state is active the job is too, with ACTIVE_STATUS's status: pending, suspended and
    requeued (the scheduler stopped the processes or put the job back in its queue) are `scheduled`, running
    is `in_progress`; none of them ends the job or uses one of its retries.
    """
    trainer = status.get("state")
    if not launch.final:
        raise ValueError(f"final_state: the launcher's state {launch.state!r} is active (ACTIVE_STATUS)")
    if cancelled:
        return ("failed", cancel_reason) if cancel_reason else ("cancelled", None)
    if launch.state == SUCCEEDED:
        if trainer == "completed":
            return "completed", None
        return "failed", (f"the launcher ({launcher}) said success, the trainer did not: its status is "
                          f"{trainer or 'missing'}" + (f" ({status['error']})" if status.get("error") else ""))
    if launch.state == CANCELLED:
        return "cancelled", f"cancelled outside this service ({launcher}: {launch.reason or launch.detail or 'cancelled'})"
    if launch.state == UNKNOWN:
        if trainer == "completed":
            return "completed", None
        if trainer in ("failed", "cancelled"):
            return trainer, status.get("error")
        return "failed", f"{launcher} no longer knows the job ({launch.reason or 'no record'}); its trainer status is {trainer or 'missing'}"
    # FAILED
    why = launch.reason or (f"exit code {launch.exit_code}" if launch.exit_code is not None else launch.detail)
    where = f"{launcher}: {launch.failed_node}; " if launch.failed_node else ""  # the peers' errors name no node
    if status.get("error"):  # the trainer's (or its first failing rank's) own words
        return "failed", f"{where}{status['error']}"
    return "failed", f"{where or launcher + ': '}{why or 'failed'}"
