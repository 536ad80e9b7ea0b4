"""The `ray` launcher: one Ray job per training job, one torchrun per node inside it.

The service talks to the cluster's Jobs REST API on the dashboard port (submit, poll, stop), so it needs
no `ray` import and no version match with the cluster. The job's entry point is a small driver on the
cluster, `python -m providers.remote_fsdp.ray_launch RUN_DIR ...`: it reserves one placement-group bundle
per node (STRICT_SPREAD), starts one actor in each and has every actor run torchrun with a static
rendezvous on the first one (its store bound to that node's Ray address). The ranks are the same
`providers.training.run` processes as with `local` and `slurm`. Run directories must be on a file system
every node mounts (`launchers.shared_dir`, at another path where `launchers.path_map` says so); only
global rank 0 writes the job's status there. Ray retries nothing (its job driver runs once, the actors have
Ray's default max_restarts=0): the JobManager owns retries. Ray's job states have no suspended or requeued
one (KubeRay's RayJob does, with Kueue: see docs/kubernetes.md).

Ray has no job priority: `scheduling.priority` orders this service's own queue only (recorded in the Ray
job's metadata as not applied), and `resources.gpu_memory_gb` has no Ray resource either.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shlex
from collections.abc import Callable

import httpx
from pydantic import BaseModel, ConfigDict, Field

from ..training.path_map import PathMap
from ..training.run_files import RunFiles
from ..training.spec import FsdpSpec, JobSpec, ResourceRequest, SchedulingSpec
from .base import (
    CANCELLED,
    FAILED,
    PENDING,
    RUNNING,
    SUCCEEDED,
    UNKNOWN,
    LastKnownStates,
    LaunchRequest,
    LaunchState,
    check_mesh,
    dns_name,
    log_tail,
    poll_until_final,
)
from .torchrun import TorchRunOptions

log = logging.getLogger("providers.remote_fsdp")

# Ray job states (ray.job_submission.JobStatus) -> launcher states.
RAY_STATES = {"PENDING": PENDING, "RUNNING": RUNNING, "SUCCEEDED": SUCCEEDED, "FAILED": FAILED, "STOPPED": CANCELLED}

# What of the job's environment reaches the ranks through the Ray job's runtime_env. Ray shows a job's
# runtime_env to whoever can read its Jobs API, so nothing secret goes there (the service's TRL_FSDP_*,
# tokens, keys): the nodes' own environment provides those. Nor does any RAY_* variable: the cluster's
# settings are the operator's (RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper=1, for one,
# makes Ray report failed jobs as SUCCEEDED).
PASSED_VARS = ("PYTHONSAFEPATH", "PYTHONUNBUFFERED", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "OMP_NUM_THREADS",
               "TOKENIZERS_PARALLELISM", "TRANSFORMERS_OFFLINE", "WANDB_MODE")
PASSED_PREFIXES = ("HF_",)
SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "CREDENTIAL")


class RayConfig(BaseModel):
    """The `ray` launcher: the Ray Jobs REST API of a cluster's dashboard (no Ray import in the service)."""

    model_config = ConfigDict(extra="forbid")
    address: str = "http://127.0.0.1:8265"
    token_env: str | None = "RAY_AUTH_TOKEN"  # environment variable holding the cluster's token, if it has one
    # Where the job's driver (the small process that places one torchrun per node) runs: the head node.
    entrypoint_resources: dict[str, float] = Field(default_factory=lambda: {"node:__internal_head__": 0.001})
    cpus_per_node: float = Field(1.0, gt=0)  # each node's torchrun reserves this much unless the job asks
    poll_s: float = Field(2.0, gt=0, le=600)


class RayError(RuntimeError):
    pass


def runtime_env_vars(env: dict[str, str]) -> dict[str, str]:
    """The variables of the job's environment that the ranks get (see PASSED_VARS), plus the shared run
    dir marker: only global rank 0 writes status.json."""
    picked = {k: v for k, v in env.items()
              if (k in PASSED_VARS or k.startswith(PASSED_PREFIXES))
              and not k.startswith(("TRL_FSDP_", "RAY_")) and not any(w in k.upper() for w in SECRET_WORDS)}
    return {**dict(sorted(picked.items())), "TRL_SHARED_RUN_DIR": "1"}


def node_resources(scheduling: SchedulingSpec, cfg: RayConfig) -> dict[str, float]:
    """One node's bundle: the job's request per node, else `cpus_per_node` CPUs."""
    res = scheduling.resources
    out: dict[str, float] = {"cpus": float(res.cpu_cores or cfg.cpus_per_node), "gpus": float(res.gpus)}
    if res.ram_gb:
        out["memory_gb"] = float(res.ram_gb)
    return out


def render_job_request(job_uuid: str, run_dir: str, opts: TorchRunOptions, scheduling: SchedulingSpec,
                       cfg: RayConfig, python: str, env: dict[str, str], suffix: str | None = None,
                       paths: PathMap | None = None) -> dict:
    """The body of `POST /api/jobs/` for a job (`run_dir` as the nodes mount it; `paths` tells the ranks the
    rest). `suffix` makes the submission id unique per run (retries and resumes submit the job again); None:
    a short random one."""
    res = node_resources(scheduling, cfg)
    argv = [python, "-m", "providers.remote_fsdp.ray_launch", run_dir,
            "--nnodes", str(opts.nnodes), "--nproc-per-node", str(opts.nproc_per_node),
            "--cpus", f"{res['cpus']:g}", "--gpus", f"{res['gpus']:g}"]
    if "memory_gb" in res:
        argv += ["--memory-gb", f"{res['memory_gb']:g}"]
    argv += ["--rdzv-timeout-s", str(opts.rdzv_timeout_s)]
    metadata = {"job_uuid": job_uuid, "service": "trl-fsdp"}
    if scheduling.priority:
        metadata["priority"] = f"{scheduling.priority} (not applied: Ray has no job priority)"
    if scheduling.resources.gpu_memory_gb:
        metadata["gpu_memory_gb"] = f"{scheduling.resources.gpu_memory_gb:g} (not applied: no Ray resource)"
    return {
        "entrypoint": shlex.join(argv),
        "submission_id": f"{dns_name(job_uuid, max_len=54)}-{suffix or secrets.token_hex(4)}",
        "runtime_env": {"env_vars": {**runtime_env_vars(env), **(paths.env() if paths else {})}},
        "entrypoint_resources": dict(cfg.entrypoint_resources),  # the driver runs on the head node
        "metadata": metadata,
    }


def short_message(message: str | None, lines: int = 6, limit: int = 2000) -> str | None:
    """Ray's job message without most of the driver log it quotes (up to 20,000 characters): its first
    line and the last lines of the log."""
    if not message:
        return None
    parts = [line for line in message.splitlines() if line.strip()]
    if len(parts) > lines + 1:
        parts = [parts[0], *parts[-lines:]]
    text = "\n".join(parts)
    return text if len(text) <= limit else text[:limit // 2] + " ... " + text[-limit // 2:]


def state_of(info: dict) -> LaunchState:
    """A launch state from `GET /api/jobs/{id}` (Ray's JobDetails)."""
    ray_state = str(info.get("status") or "")
    state = RAY_STATES.get(ray_state, RUNNING if ray_state else UNKNOWN)
    reason = None
    if state in (PENDING, FAILED, CANCELLED):
        reason = short_message(info.get("message")) or info.get("error_type")
    code = info.get("driver_exit_code")
    return LaunchState(state, detail=ray_state or None, reason=reason, exit_code=code if isinstance(code, int) else None)


class RayLauncher:
    name = "ray"
    runs_elsewhere = True

    @classmethod
    def from_config(cls, cfg, python: str) -> RayLauncher:
        """The launcher of the service's `launchers` config (its `ray` section)."""
        return cls(cfg.section("ray"), python, paths=PathMap(cfg.path_map))

    def __init__(self, cfg: RayConfig, python: str, transport: httpx.BaseTransport | None = None,
                 paths: PathMap | None = None):
        self.cfg = cfg
        self.python = python
        self.paths = paths or PathMap()  # this host's shared dir -> the nodes' mount of it
        headers = {}
        token = os.environ.get(cfg.token_env) if cfg.token_env else None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.http = httpx.Client(base_url=cfg.address.rstrip("/"), headers=headers, timeout=30, transport=transport)
        self.last_known = LastKnownStates(f"the Ray Jobs API at {cfg.address}")

    def check(self, torch_run: TorchRunOptions, fsdp: FsdpSpec | None, resources: ResourceRequest) -> None:
        """Only what no host decides: the mesh. The nodes check their GPUs and knobs when the job loads."""
        check_mesh(fsdp, torch_run)

    def unhonoured(self, spec: JobSpec) -> dict[str, str]:
        out = {}
        if spec.scheduling.priority:
            out["scheduling.priority"] = "Ray has no job priority"
        if spec.scheduling.resources.gpu_memory_gb:
            out["scheduling.resources.gpu_memory_gb"] = ("ray has no request for GPU memory (name a node feature "
                                                         "or custom resource in the launcher's config)")
        return out

    def submit(self, request: LaunchRequest) -> str:
        """POST the job to the Ray Jobs API (its body also in RUN_DIR/ray_job.json)."""
        files, job_uuid, scheduling = request.files, request.job_uuid, request.scheduling
        opts = TorchRunOptions(nnodes=request.nnodes, nproc_per_node=request.nproc_per_node,
                               rdzv_timeout_s=request.rdzv_timeout_s)
        body = render_job_request(job_uuid, self.paths.to_job(str(files.dir)), opts, scheduling, self.cfg, self.python,
                                  request.env, paths=self.paths)
        # What was asked of Ray, beside the job's other files (it holds no secret: see PASSED_VARS).
        (files.dir / "ray_job.json").write_text(json.dumps(body, indent=2) + "\n")
        if scheduling.priority:
            log.warning("job %s: priority %d orders this service's queue only (Ray has no job priority)",
                        job_uuid, scheduling.priority)
        try:
            r = self.http.post("/api/jobs/", json=body)
        except httpx.HTTPError as e:
            raise RayError(f"the Ray Jobs API at {self.cfg.address} is unreachable: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise RayError(f"Ray refused the job (HTTP {r.status_code}): {r.text.strip()[:1000]}")
        return r.json().get("submission_id") or body["submission_id"]

    def poll(self, external_id: str, files: RunFiles) -> LaunchState:
        try:
            r = self.http.get(f"/api/jobs/{external_id}")
        except httpx.HTTPError as e:
            return self.last_known.unreachable(external_id, f"{type(e).__name__}: {e}")
        if r.status_code == 404:
            return LaunchState(UNKNOWN, reason=f"Ray has no job {external_id} (HTTP 404)")
        if r.status_code != 200:
            return self.last_known.unreachable(external_id, f"HTTP {r.status_code}: {r.text.strip()[:300]}")
        return self.last_known.answered(external_id, state_of(r.json()))

    def logs(self, external_id: str, files: RunFiles, limit_bytes: int = 64 * 1024) -> str:
        """The driver's log from the Ray Jobs API (what the job printed before its ranks started, or why they
        could not), else the job's log in the shared run dir."""
        try:
            r = self.http.get(f"/api/jobs/{external_id}/logs")
            if r.status_code == 200:
                return str(r.json().get("logs") or "")[-limit_bytes:]
        except (httpx.HTTPError, ValueError) as e:
            log.warning("ray job logs %s: %s", external_id, e)
        return log_tail(files.log, limit_bytes)

    def wait(self, external_id: str, files: RunFiles, on_change: Callable[[LaunchState], None]) -> LaunchState:
        return poll_until_final(self, external_id, files, on_change, self.cfg.poll_s)

    def cancel(self, external_id: str) -> None:
        try:
            r = self.http.post(f"/api/jobs/{external_id}/stop")
            if r.status_code != 200:
                log.warning("ray job stop %s: HTTP %d %s", external_id, r.status_code, r.text.strip()[:300])
        except httpx.HTTPError as e:
            log.warning("ray job stop %s: %s", external_id, e)

    def alive(self, external_id: str, files: RunFiles) -> bool:
        # Always followed again: a job Ray forgot (404) is unknown, and its status.json decides how it ended.
        return True
