"""The `slurm` launcher: one sbatch job per training job, one torchrun per node under srun.

The batch script asks for `nnodes` nodes with one task each; every task runs torchrun, which starts the
node's ranks, and a static rendezvous (node rank = SLURM_NODEID) joins the nodes on the allocation's first
node, whose store listens on that node's Slurm address (NodeAddr) only (providers/training/bound_store.py). The service talks to Slurm through its
commands (sbatch, scontrol, sacct where accounting exists, scancel), so it runs on any login node and
needs no Python binding. Run directories must be on a file system every node mounts
(`launchers.shared_dir`, at another path where `launchers.path_map` says so); only global rank 0 writes the
job's status there. Slurm never requeues a job (`--no-requeue`): the JobManager owns retries. A job Slurm
suspends (scontrol suspend, PreemptMode=SUSPEND) is `suspended`; one it put back in its queue is `requeued`.
"""

from __future__ import annotations

import logging
import math
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..training.bound_store import torchrun_argv
from ..training.path_map import PathMap
from ..training.run_files import RUN_STARTED, RunFiles
from ..training.spec import FsdpSpec, JobSpec, ResourceRequest, SchedulingSpec
from .base import (
    CANCELLED,
    FAILED,
    PENDING,
    REQUEUED,
    RUNNING,
    SUCCEEDED,
    SUSPENDED,
    UNKNOWN,
    LastKnownStates,
    LauncherUnavailable,
    LaunchRequest,
    LaunchState,
    check_mesh,
    dns_name,
    log_tail,
    poll_until_final,
)
from .torchrun import TorchRunOptions

log = logging.getLogger("providers.remote_fsdp")

# Slurm job states (squeue(1), "JOB STATE CODES") -> launcher states.
SLURM_STATES = {
    "PENDING": PENDING, "CONFIGURING": PENDING, "RESV_DEL_HOLD": PENDING, "SPECIAL_EXIT": PENDING,
    "REQUEUED": REQUEUED, "REQUEUE_HOLD": REQUEUED, "REQUEUE_FED": REQUEUED,
    "RUNNING": RUNNING, "COMPLETING": RUNNING, "STAGE_OUT": RUNNING, "SIGNALING": RUNNING, "RESIZING": RUNNING,
    "SUSPENDED": SUSPENDED, "STOPPED": SUSPENDED,
    "COMPLETED": SUCCEEDED,
    "CANCELLED": CANCELLED,
    "FAILED": FAILED, "TIMEOUT": FAILED, "NODE_FAIL": FAILED, "OUT_OF_MEMORY": FAILED, "PREEMPTED": FAILED,
    "BOOT_FAIL": FAILED, "DEADLINE": FAILED, "REVOKED": FAILED,
}
WHY = {
    "TIMEOUT": "the job reached its Slurm time limit", "NODE_FAIL": "a node of the job failed",
    "OUT_OF_MEMORY": "a node ran out of memory", "PREEMPTED": "Slurm preempted the job",
    "BOOT_FAIL": "a node failed to boot", "DEADLINE": "the job reached its Slurm deadline",
    "SUSPENDED": "Slurm suspended the job", "STOPPED": "Slurm stopped the job's processes (SIGSTOP)",
    "REQUEUED": "Slurm put the job back in its queue",
}


class SlurmConfig(BaseModel):
    """The `slurm` launcher: sbatch/squeue/scontrol/scancel on this host (a login node of the cluster)."""

    model_config = ConfigDict(extra="forbid")
    partition: str | None = None
    account: str | None = None
    time_limit: str | None = None  # sbatch --time, e.g. "24:00:00"
    extra_sbatch: list[Annotated[str, Field(pattern=r"^--[^\n\r]*$")]] = Field(default_factory=list)  # e.g. ["--exclusive"]
    # --nice = max(min_nice, nice_base - priority). Defaults: priority 0 runs at nice 0, as other users' jobs
    # do; a lower priority runs nicer; a higher one gets no lower nice unless the operator sets min_nice below
    # nice_base (nice_base: 100, min_nice: 0 orders the service's own jobs; a negative nice needs Slurm
    # operator rights).
    nice_base: int = Field(0, ge=0, le=10_000)
    min_nice: int | None = Field(None, ge=-10_000, le=10_000)  # None: nice_base
    poll_s: float = Field(2.0, gt=0, le=600)

    @model_validator(mode="after")
    def _nice_range(self) -> SlurmConfig:
        if self.min_nice is not None and self.min_nice > self.nice_base:
            raise ValueError(f"launchers.slurm.min_nice: {self.min_nice} is above nice_base ({self.nice_base}); "
                             "a higher priority may only lower the nice value")
        return self


def nice_of(priority: int, cfg: SlurmConfig) -> int:
    """A job's `--nice` from its priority (higher priority, lower nice, never below the operator's min_nice)."""
    floor = cfg.nice_base if cfg.min_nice is None else cfg.min_nice
    return max(floor, cfg.nice_base - priority)


class SlurmError(RuntimeError):
    pass


class SlurmUnavailable(LauncherUnavailable):
    pass


def render_sbatch(job_uuid: str, run_dir: str, opts: TorchRunOptions, scheduling: SchedulingSpec, cfg: SlurmConfig,
                  python: str) -> str:
    """The batch script of a job. Paths reach the shell quoted; the resource lines come from validated
    numbers and the operator's config, never from a request's strings."""
    res = scheduling.resources
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={dns_name(job_uuid)}",
        "#SBATCH --no-requeue",  # the JobManager owns retries (providers/launchers/base.py)
        f"#SBATCH --nodes={opts.nnodes}",
        "#SBATCH --ntasks-per-node=1",  # one torchrun per node; it starts the node's ranks
        f"#SBATCH --cpus-per-task={max(res.cpu_cores, opts.nproc_per_node)}",
    ]
    if res.gpus:
        lines.append(f"#SBATCH --gres=gpu:{res.gpus}")
    if res.ram_gb:
        lines.append(f"#SBATCH --mem={math.ceil(res.ram_gb * 1024)}M")
    lines.append(f"#SBATCH --nice={nice_of(scheduling.priority, cfg)}")
    for flag, value in (("partition", cfg.partition), ("account", cfg.account), ("time", cfg.time_limit)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [f"#SBATCH {extra}" for extra in cfg.extra_sbatch]
    # Static rendezvous: Slurm numbers the nodes; node 0's store listens on the head's address only.
    node_command = " ".join([
        "exec", *torchrun_argv(shlex.quote(python), nnodes='"$SLURM_NNODES"', nproc_per_node=opts.nproc_per_node,
                               node_rank='"$SLURM_NODEID"', run_id='"$SLURM_JOB_ID"', endpoint='"$TRL_RDZV_ENDPOINT"',
                               timeout_s=opts.rdzv_timeout_s),
        "-m", "providers.training.run", shlex.quote(run_dir),
    ])
    lines += [
        "set -euo pipefail",
        "# The allocation's first node hosts the rendezvous; the port comes from the job id, so jobs sharing",
        "# a node do not collide.",
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        'head_addr=$(scontrol show node "$head" | sed -n \'s/.*NodeAddr=\\([^ ]*\\).*/\\1/p\')',
        'export TRL_RDZV_ENDPOINT="${head_addr:-$head}:$((20000 + SLURM_JOB_ID % 20000))"',
        "export TRL_SHARED_RUN_DIR=1  # the run dir is shared: only global rank 0 writes status.json",
        f"srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c {shlex.quote(node_command)}",
    ]
    return "\n".join(lines) + "\n"


def parse_scontrol(text: str) -> dict[str, str]:
    """`scontrol show job -o ID` output as a dict of its Key=Value fields (values without spaces)."""
    return dict(re.findall(r"(\w+)=(\S*)", text))


# srun's own lines in the job's output when a node's task ends badly (one task per node: task N is node rank N).
SRUN_TASK_FAILED = re.compile(r"^srun: error: ([\w.-]+): tasks? (\d+)(?:-\d+)?: (.+)$", re.M)
SRUN_NODE_FAILED = re.compile(r"^srun: error: Node failure on ([\w.-]+)", re.M)


def failed_node(output: str, nproc_per_node: int, dead_rank: int | None = None) -> str | None:
    """The node that failed, with its node rank and global ranks, from srun's lines in the job's output (this
    run's part): the node of `dead_rank` (a rank torchrun saw die) when srun names it, else the first task
    srun saw fail; None when srun named none."""
    output = output[output.rfind(RUN_STARTED) + 1:] if RUN_STARTED in output else output
    tasks = list(SRUN_TASK_FAILED.finditer(output))
    if dead_rank is not None:  # the peers' tasks may end first, failing because it died
        tasks = [t for t in tasks if int(t.group(2)) == dead_rank // nproc_per_node] or tasks
    if tasks:
        host, node_rank, why = tasks[0].group(1), int(tasks[0].group(2)), tasks[0].group(3).strip()
        first = node_rank * nproc_per_node
        ranks = f"rank {first}" if nproc_per_node == 1 else f"ranks {first}-{first + nproc_per_node - 1}"
        return f"node {host} (node rank {node_rank}, {ranks}): {why[:200]}"
    node = SRUN_NODE_FAILED.search(output)
    return f"node {node.group(1)} failed" if node else None


def state_of(slurm_state: str, reason: str | None, exit_code: str | None, restarts: int = 0) -> LaunchState:
    """Our state of a Slurm job's (scontrol's JobState, Reason, ExitCode, Restarts). A PENDING job that ran
    before (Restarts > 0: requeued after preemption or a node failure) is `requeued`."""
    base = slurm_state.split()[0].rstrip("+") if slurm_state else ""
    state = SLURM_STATES.get(base, UNKNOWN if not base else RUNNING)
    if state == PENDING and restarts > 0:
        state = REQUEUED
    code = None
    if exit_code and re.fullmatch(r"\d+:\d+", exit_code):
        rc, sig = (int(x) for x in exit_code.split(":"))
        code = rc or (128 + sig if sig else 0)
    why = WHY.get(base) or (f"Slurm put the job back in its queue (restart {restarts})" if state == REQUEUED else None)
    if reason and reason not in ("None", "(null)"):
        why = f"{why} ({reason})" if why else reason
    if state == FAILED and not why:
        why = f"Slurm job {base}" + (f" with exit code {exit_code}" if exit_code else "")
    return LaunchState(state, detail=base, reason=why, exit_code=code)


class SlurmLauncher:
    name = "slurm"
    runs_elsewhere = True

    @classmethod
    def from_config(cls, cfg, python: str) -> SlurmLauncher:
        """The launcher of the service's `launchers` config (its `slurm` section)."""
        return cls(cfg.section("slurm"), python, paths=PathMap(cfg.path_map))

    def __init__(self, cfg: SlurmConfig, python: str, runner: Callable[..., subprocess.CompletedProcess] = subprocess.run,
                 paths: PathMap | None = None):
        self.cfg = cfg
        self.python = python
        self.paths = paths or PathMap()  # this host's shared dir -> the nodes' mount of it
        self.run = runner
        self.last_known = LastKnownStates("Slurm")
        missing = [c for c in ("sbatch", "scontrol", "scancel") if shutil.which(c) is None]
        if missing and runner is subprocess.run:
            raise SlurmUnavailable(f"launchers.enabled: slurm needs the Slurm commands {missing} on this host's PATH")

    def check(self, torch_run: TorchRunOptions, fsdp: FsdpSpec | None, resources: ResourceRequest) -> None:
        """Only what no host decides: the mesh. The nodes check their GPUs and knobs when the job loads."""
        check_mesh(fsdp, torch_run)

    def unhonoured(self, spec: JobSpec) -> dict[str, str]:
        if spec.scheduling.resources.gpu_memory_gb:
            return {"scheduling.resources.gpu_memory_gb": "slurm has no request for GPU memory (name a node feature "
                                                          "or custom resource in the launcher's config)"}
        return {}

    def _cmd(self, argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return self.run(argv, capture_output=True, text=True, timeout=60, env=env)

    def submit(self, request: LaunchRequest) -> str:
        """Write RUN_DIR/slurm.sbatch (paths as the nodes mount them) and sbatch it."""
        files = request.files
        opts = TorchRunOptions(nnodes=request.nnodes, nproc_per_node=request.nproc_per_node,
                               rdzv_timeout_s=request.rdzv_timeout_s)
        run_dir = self.paths.to_job(str(files.dir))
        script = files.dir / "slurm.sbatch"
        script.write_text(render_sbatch(request.job_uuid, run_dir, opts, request.scheduling, self.cfg, self.python))
        # The job's environment (the service's secrets removed) is what sbatch exports to the job.
        r = self._cmd(["sbatch", "--parsable", f"--chdir={run_dir}", f"--output={self.paths.to_job(str(files.log))}",
                       "--open-mode=append", str(script)], env={**request.env, **self.paths.env()})
        if r.returncode != 0:
            raise SlurmError(f"sbatch refused the job: {(r.stderr or r.stdout).strip()[:1000]}")
        return r.stdout.strip().split(";")[0]

    def poll(self, external_id: str, files: RunFiles) -> LaunchState:
        try:
            r = self._cmd(["scontrol", "show", "job", "-o", external_id])
        except subprocess.TimeoutExpired:
            return self.last_known.unreachable(external_id, "scontrol timed out")
        if r.returncode == 0 and "JobState=" in r.stdout:
            f = parse_scontrol(r.stdout)
            restarts = int(f["Restarts"]) if f.get("Restarts", "").isdigit() else 0
            return self.last_known.answered(external_id, self._where(state_of(
                f.get("JobState", ""), f.get("Reason"), f.get("ExitCode"), restarts), files))
        if "invalid job id" not in (r.stderr + r.stdout).lower():  # slurmctld down or restarting, not a verdict
            return self.last_known.unreachable(external_id, (r.stderr or r.stdout).strip()[:300])
        # scontrol forgets finished jobs after MinJobAge; sacct remembers them where accounting is on.
        if shutil.which("sacct"):
            a = self._cmd(["sacct", "-n", "-P", "-X", "-j", external_id, "-o", "State,ExitCode,Reason"])
            line = a.stdout.strip().splitlines()[0] if a.returncode == 0 and a.stdout.strip() else ""
            if line.count("|") >= 2:
                state, code, reason = line.split("|")[:3]
                return self._where(state_of(state, reason, code), files)
        return LaunchState(UNKNOWN, reason=(r.stderr or r.stdout).strip()[:300] or "no record")

    def _where(self, state: LaunchState, files: RunFiles) -> LaunchState:
        """A failed job's state with the node (and its ranks) srun saw fail first."""
        if state.state != FAILED:
            return state
        try:
            nproc = TorchRunOptions.model_validate_json((files.dir / "torchrun.json").read_text()).nproc_per_node
            output = files.log.read_text(errors="replace")[-200_000:]
        except (OSError, ValueError):
            return state
        killed = files.killed_rank()  # torchrun's root cause, when a rank died and its agent lived
        state.failed_node = failed_node(output, nproc, int(killed[0]) if killed else None)
        return state

    def logs(self, external_id: str, files: RunFiles, limit_bytes: int = 64 * 1024) -> str:
        """The job's output (sbatch --output: RUN_DIR/logs/train.log on the shared file system), srun's lines too."""
        return log_tail(files.log, limit_bytes)

    def wait(self, external_id: str, files: RunFiles, on_change: Callable[[LaunchState], None]) -> LaunchState:
        return poll_until_final(self, external_id, files, on_change, self.cfg.poll_s)

    def cancel(self, external_id: str) -> None:
        r = self._cmd(["scancel", external_id])
        if r.returncode != 0:
            log.warning("scancel %s: %s", external_id, (r.stderr or r.stdout).strip())

    def alive(self, external_id: str, files: RunFiles) -> bool:
        return True  # always followed again: even a job Slurm forgot ends from its status.json
