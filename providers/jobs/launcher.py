"""Launchers: how a job's processes are started, followed and stopped.

The JobManager owns the queue and the job records; a launcher only knows how to start the training entry
point somewhere and what the place it started it says about it. `local` starts it on this host (forked
from the preloaded zygote, or spawned); the service adds `slurm` and `ray`
(providers/remote_fsdp/service/launchers/). Each job records its launcher's name and the external id the
launcher returned, so a restarted server re-attaches to jobs that outlived it.

Truth comes from both sides: what the launcher reports (`LaunchState`) and what the trainer wrote in
RUN_DIR/status.json. `final_state` joins them in one table.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..training.run_files import RunFiles
from ..training.spec import JobSpec
from .zygote import launch_job_process

# Launcher states: pending and running are active; the rest are final.
PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED, UNKNOWN = "pending", "running", "succeeded", "failed", "cancelled", "unknown"
LAUNCH_FINAL = (SUCCEEDED, FAILED, CANCELLED, UNKNOWN)


@dataclass
class LaunchState:
    """What a launcher says about a job: `state` (one of the constants above), the launcher's own state
    name and reason (Slurm's `PENDING`/`Resources`, Ray's `FAILED`/its message), and an exit code."""

    state: str
    detail: str | None = None  # the launcher's own state name
    reason: str | None = None
    exit_code: int | None = None

    @property
    def final(self) -> bool:
        return self.state in LAUNCH_FINAL


class Launcher(Protocol):
    name: str

    def submit(self, job_uuid: str, spec: JobSpec, files: RunFiles, argv: list[str], env: dict[str, str]) -> str:
        """Start the job (argv: this host's torchrun or entry-point command, for launchers that use it);
        returns the launcher's id of it."""

    def poll(self, external_id: str, files: RunFiles) -> LaunchState: ...

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
    | launcher: failed (exit code, TIMEOUT, NODE_FAIL) | failed    | the trainer's error, else the launcher's reason |
    | launcher: unknown (forgot the job)               | status.json's final state, else failed |
    """
    trainer = status.get("state")
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
    if status.get("error"):  # the trainer's (or its first failing rank's) own words
        return "failed", status["error"]
    return "failed", f"{launcher}: {why or 'failed'}"


# -- local: this host -------------------------------------------------------------------------------------
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


class LocalLauncher:
    """Jobs as process groups on this host. The external id is the group leader's pid (= its pgid)."""

    name = "local"

    def __init__(self, niceness: int = 0):
        self.niceness = niceness
        self._procs: dict[str, subprocess.Popen] = {}

    def submit(self, job_uuid: str, spec: JobSpec, files: RunFiles, argv: list[str], env: dict[str, str]) -> str:
        with open(files.log, "ab") as out:
            # Forked from the preloaded zygote when it can (the same session, env, cwd and log), else Popen.
            proc = launch_job_process(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: cancel signals the whole tree
                preexec_fn=self._lower_priority,
                env=env,
                cwd=str(files.dir),
                niceness=self.niceness,
            )
        self._procs[str(proc.pid)] = proc
        return str(proc.pid)

    def _lower_priority(self) -> None:
        # On a CPU-only host the job's processes compete with the server for cores: a lower priority
        # keeps status polls and cancels quick without slowing training when cores are free.
        if self.niceness:
            os.nice(self.niceness)

    def running(self) -> int:
        return sum(1 for p in self._procs.values() if p.poll() is None)

    def poll(self, external_id: str, files: RunFiles) -> LaunchState:
        proc = self._procs.get(external_id)
        if proc is None:
            return LaunchState(UNKNOWN, reason="not started by this server")
        code = proc.poll()
        if code is None:
            return LaunchState(RUNNING)
        return LaunchState(SUCCEEDED if code == 0 else FAILED, exit_code=code,
                           reason=None if code == 0 else f"training process exited with code {code}")

    def wait(self, external_id: str, files: RunFiles, on_change: Callable[[LaunchState], None]) -> LaunchState:
        proc = self._procs[external_id]
        proc.wait()
        # Ranks of a failed torchrun job may linger; nothing of the job may outlive it.
        if process_group_alive(proc.pid):
            kill_process_group(proc.pid, grace_s=2.0)
        state = self.poll(external_id, files)
        self._procs.pop(external_id, None)
        return state

    def cancel(self, external_id: str) -> None:
        proc = self._procs.get(external_id)
        if proc is not None:
            kill_process_group(proc.pid)
            proc.wait()

    def alive(self, external_id: str, files: RunFiles) -> bool:
        # A local job's supervisor was this server: after a restart its processes are stopped, not followed.
        return False

    def stop_orphan(self, external_id: str, files: RunFiles) -> None:
        """Stop what is left of a job whose server died (its recorded group, if it still runs the job)."""
        pgid = int(external_id)
        if process_group_runs(pgid, str(files.dir)):
            kill_process_group(pgid)
