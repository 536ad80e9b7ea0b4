"""The `local` launcher: a job's processes as one process group on this host (forked from the preloaded
zygote, or spawned). The external id is the group leader's pid."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import BadRequest
from ..jobs.zygote import launch_job_process
from ..training.run_files import RunFiles
from ..training.spec import FsdpSpec, JobSpec, ResourceRequest
from .base import FAILED, RUNNING, SUCCEEDED, UNKNOWN, LaunchRequest, LaunchState, check_mesh, log_tail


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


def groups_running(run_dir: str) -> set[int]:
    """The process groups (not this process's own) that hold a process whose command line names `run_dir`."""
    proc, own = Path("/proc"), os.getpgrp()
    # the run dir as a whole path: runs/job-1 must not match runs/job-1-queued
    needle = re.compile(re.escape(str(run_dir).encode()) + rb"(?=$|[\x00 /)])")
    groups: set[int] = set()
    if not proc.is_dir():
        return groups
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) != own and needle.search((entry / "cmdline").read_bytes()):
                groups.add(int(fields[2]))
        except (OSError, IndexError, ValueError):
            continue
    return groups


def check_host_processes(nproc_per_node: int) -> None:
    """Refuse more ranks than this host's GPUs, or so many on its CPU cores that they would thrash."""
    from ..training.devices import cuda_available, device_type

    if cuda_available() and nproc_per_node > _gpu_count():
        raise BadRequest(
            f"training_config.torch_run_config.nproc_per_node: {nproc_per_node} processes but this "
            f"node has {_gpu_count()} GPUs"
        )
    if nproc_per_node > (os.cpu_count() or 1) * 4 and device_type() == "cpu":
        raise BadRequest(
            f"training_config.torch_run_config.nproc_per_node: {nproc_per_node} processes on "
            f"{os.cpu_count()} CPU cores would thrash; use at most {(os.cpu_count() or 1) * 4}"
        )


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


class LocalLauncher:
    """Jobs as process groups on this host. The external id is the group leader's pid (= its pgid)."""

    name = "local"
    runs_elsewhere = False

    def __init__(self, niceness: int | None = None):
        self._niceness = niceness
        self._procs: dict[str, subprocess.Popen] = {}
        self._adopted: dict[str, str] = {}  # pgid -> run dir: parts of multi-node jobs followed again after a restart
        # Why this host cannot hold one node's share of a job's resources (None: it can); the service
        # sets it from its node registry's view of this host. None: no resources check.
        self.misfit: Callable[[ResourceRequest], str | None] | None = None

    def check(self, torch_run, fsdp: FsdpSpec | None, resources: ResourceRequest) -> None:
        """This host runs the job: its mesh, its GPUs and cores, its resources request."""
        if fsdp is not None:
            check_mesh(fsdp, torch_run)
            check_host_processes(torch_run.nproc_per_node)
        why = self.misfit(resources) if self.misfit is not None else None
        if why:
            raise BadRequest(f"training_config.scheduling.resources: this host cannot hold the job: {why}")

    def unhonoured(self, spec: JobSpec) -> dict[str, str]:
        return {}

    def submit(self, request: LaunchRequest) -> str:
        """Run this host's command for the job (`request.command`) as its own process group."""
        files = request.files
        with open(files.log, "ab") as out:
            # Forked from the preloaded zygote when it can (the same session, env, cwd and log), else Popen.
            proc = launch_job_process(
                request.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: cancel signals the whole tree
                preexec_fn=self._lower_priority,
                env=request.env,
                cwd=str(files.dir),
                niceness=self.niceness,
            )
        self._procs[str(proc.pid)] = proc
        return str(proc.pid)

    @property
    def niceness(self) -> int:
        """The jobs' niceness: given, else 10 on a CPU-only host (see _lower_priority) and 0 beside GPUs,
        decided at the first job (it imports torch)."""
        if self._niceness is None:
            from ..training.devices import cuda_available

            self._niceness = 0 if cuda_available() else 10
        return self._niceness

    def _lower_priority(self) -> None:
        # On a CPU-only host the job's processes compete with the server for cores: a lower priority
        # keeps status polls and cancels quick without slowing training when cores are free.
        if self.niceness:
            os.nice(self.niceness)

    def running(self) -> int:
        return (sum(1 for p in self._procs.values() if p.poll() is None)
                + sum(1 for pgid, run_dir in list(self._adopted.items()) if process_group_runs(int(pgid), run_dir)))

    def poll(self, external_id: str, files: RunFiles) -> LaunchState:
        proc = self._procs.get(external_id)
        if proc is None:
            return LaunchState(UNKNOWN, reason="not started by this server")
        code = proc.poll()
        if code is None:
            return LaunchState(RUNNING)
        return LaunchState(SUCCEEDED if code == 0 else FAILED, exit_code=code,
                           reason=None if code == 0 else f"training process exited with code {code}")

    def logs(self, external_id: str, files: RunFiles, limit_bytes: int = 64 * 1024) -> str:
        """The job's log: its processes write it on this host."""
        return log_tail(files.log, limit_bytes)

    def wait(self, external_id: str, files: RunFiles, on_change: Callable[[LaunchState], None]) -> LaunchState:
        if external_id in self._adopted:  # not this process's child: no exit code, the run's status file says
            while process_group_runs(int(external_id), str(files.dir)):
                time.sleep(1.0)
            self._adopted.pop(external_id, None)
            if files.read_status().get("state") == "completed":
                return LaunchState(SUCCEEDED, exit_code=0)
            return LaunchState(FAILED, reason="the job's processes ended without completing (followed again after a "
                                              "server restart: their exit code is unknown)")
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
        elif external_id in self._adopted and process_group_runs(int(external_id), self._adopted[external_id]):
            kill_process_group(int(external_id))

    def alive(self, external_id: str, files: RunFiles) -> bool:
        """After a restart: a part of a multi-node job that still runs is followed again (stopping it would fail
        every node's part); a one-node job's supervisor was this server, so its processes are stopped instead."""
        try:
            nnodes = json.loads((files.dir / "torchrun.json").read_text()).get("nnodes", 1)
        except (OSError, ValueError, AttributeError):
            return False
        if nnodes > 1 and process_group_runs(int(external_id), str(files.dir)):
            self._adopted[external_id] = str(files.dir)
            return True
        return False

    def stop_strays(self, files: RunFiles) -> None:
        """Stop processes of a job the server had started but not yet recorded as started when it died (its run
        dir named on their command line): the job is queued again, and one incarnation at a time may run."""
        for pgid in groups_running(str(files.dir)):
            kill_process_group(pgid)

    def stop_orphan(self, external_id: str, files: RunFiles) -> None:
        """Stop what is left of a job whose server died (its recorded group, if it still runs the job)."""
        pgid = int(external_id)
        if process_group_runs(pgid, str(files.dir)):
            kill_process_group(pgid)
