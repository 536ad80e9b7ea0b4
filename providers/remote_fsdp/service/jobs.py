"""FsdpJobService: turns validated requests into torchrun jobs on the shared JobManager, and keeps the
service's uploaded datasets (JSONL files, streamed to disk so 100k-row uploads need no memory)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ... import access
from ...errors import BadRequest, Conflict, client_errors, first_validation_error
from ...jobs.manager import JobManager
from ...api.paths import ProviderDefaults, check_job_uuid, resolve_model
from ...api.requests import PreferenceOptimizeRequest, SupervisedFineTuneRequest, TrainingConfig
from ...api.to_spec import (
    data_config_of,
    method_of,
    preference_target,
    prepare_job,
    scheduling_spec,
    teacher_job_spec,
)
from ...jobs.store import JobRecord, JobStore
from ...launchers import build_launchers, runs_elsewhere
from ...launchers.base import Launcher
from ...launchers.local import LocalLauncher
from ...launchers.nodes import NodesLauncher
from ...launchers.torchrun import TorchRunOptions, torchrun_command
from ...training.devices import backend, device_type
from ...training.keys import unknown_key_message
from ...training.run_files import RunFiles
from ...training.spec import FsdpSpec, JobSpec, SchedulingSpec, check_name
from .config import ServiceConfig
from .nodes import misfit
from .quota import rows_bytes
from .security import DiskQuota, clean_partial_files

# What a client may set in torch_run_config; the rest (placement) comes from a coordinator. rdzv_backend
# stays for clients that send "static"; any other value is a 400 (TorchRunOptions.only_static says why).
CLIENT_TORCH_RUN_KEYS = {"nproc_per_node", "nnodes", "rdzv_backend", "rdzv_timeout_s", "launcher", "rank_start"}


def _validation_message(e: ValidationError, field: str) -> str:
    return first_validation_error(e, field)


class FsdpJobService:
    def __init__(self, config: ServiceConfig):
        self.config = config
        self.data_dir = config.data_path
        self.datasets_dir = self.data_dir / "datasets"
        self.datasets_dir.mkdir(parents=True, exist_ok=True)
        # Run dirs and default checkpoint dirs lie where every node that runs a job sees them (shared_dir).
        self.runs_dir = config.shared_path / "runs"
        own_dirs = [str(self.data_dir)] if config.launchers.shared_dir else []  # pipelines' teacher outputs
        self.defaults = ProviderDefaults(
            data_dir=str(config.shared_path), dtype=config.dtype,
            allowed_checkpoint_roots=config.allowed_checkpoint_roots,
            allowed_model_roots=[*config.model_roots(), *own_dirs],
            checkpoint_roots_hint="start the service with --allowed-checkpoint-root DIR",
            model_roots_hint="start the service with --allowed-model-root DIR (or --model-dir)",
            hub_downloads=config.outbound.hub_downloads,
            private_dirs=[str(self.data_dir), str(config.shared_path)], path_owner=self.path_owner,
        )
        for directory in (self.datasets_dir, self.data_dir / "uploaded_teacher_outputs", self.data_dir / "tmp"):
            clean_partial_files(directory)  # what uploads and extractions cut short by a crash left
        env = {"GLOO_SOCKET_IFNAME": config.gloo_socket_ifname} if config.gloo_socket_ifname else {}
        env.update({v: os.environ[v] for v in config.pass_env.get("training", []) if v in os.environ})  # --pass-env
        self.jobs = JobManager(JobStore(self.data_dir / "jobs.db"), self._command, config.max_concurrent_jobs, env,
                               runs_dir=self.runs_dir, max_queued_jobs=config.max_queued_jobs,
                               launchers=build_launchers(config),
                               progress_timeout_s=config.progress_timeout_s)
        self.nodes: NodesLauncher | None = None  # the `nodes` launcher, once the app has the node registry
        # Who owns what in the data dir: folder -> (its path parts below the folder -> owner). Add-ons add their
        # folders (openai_ft: its `ft:` models; pipelines; workflow tasks) with `own_folder`.
        self.folder_owners: dict[Path, Callable[[tuple[str, ...]], str | None]] = {}
        job_owner = lambda parts: self.jobs.store.owner_of(parts[0]) if parts else None
        self.own_folder(self.runs_dir, job_owner)
        self.own_folder(self.data_dir / "teacher_outputs", job_owner)
        for users_dir in (self.datasets_dir / "users", self.defaults.checkpoints_root / "users"):
            self.own_folder(users_dir, lambda parts: parts[0] if parts else None)

    def own_folder(self, folder: Path, owner_of: Callable[[tuple[str, ...]], str | None]) -> None:
        """Declare who owns the paths below `folder` (a path's parts below it -> the owner's name)."""
        self.folder_owners[folder.resolve()] = owner_of

    def path_owner(self, path: Path) -> str | None:
        """The user who owns `path` (resolved) in the data or shared dir; None: the service's own (admins only)."""
        for folder, owner_of in self.folder_owners.items():
            if folder == path or folder in path.parents:
                return owner_of(path.relative_to(folder).parts)
        return None

    # -- launchers -----------------------------------------------------------------------------------
    def attach_nodes(self, nodes: NodesLauncher) -> None:
        """Take the `nodes` launcher (it needs the app's node registry); `local` checks resources against
        this host as the registry sees it."""
        self.nodes = nodes
        self.jobs.local.misfit = lambda resources: misfit(nodes.registry.local.capabilities, resources)
        self.jobs.failure_context = nodes.silent_nodes

    def launcher(self, name: str) -> Launcher:
        """The launcher object named `name` on this service."""
        if self.nodes is not None and name == self.nodes.name:
            return self.nodes
        if name not in self.jobs.launchers:
            raise BadRequest(f"training_config.torch_run_config.launcher: {name!r} is not enabled on this server "
                             f"(enabled: {sorted(self.jobs.launchers)})")
        return self.jobs.launchers[name]

    def _placed_by_nodes(self, job_uuid: str) -> bool:
        return self.nodes is not None and (self.nodes.is_waiting(job_uuid) or self.nodes.is_distributed(job_uuid))

    # -- what the routes call, for every launcher ----------------------------------------------------
    def submit_job(self, route: str, req: SupervisedFineTuneRequest | PreferenceOptimizeRequest) -> dict[str, str]:
        """A client's job: placed on registered nodes when it spans them (the `nodes` launcher), else
        submitted here for its launcher (local, slurm, ray; a one-node `nodes` job runs `local`)."""
        if self.nodes is not None and self.nodes.is_waiting(req.job_uuid):
            raise Conflict(f"job_uuid: a job named {req.job_uuid!r} already exists (waiting for nodes)")
        opts = self.torch_run_options(req.training_config.torch_run_config or {})
        if req.part_of is None and self.spans_registry_nodes(opts):
            return self.nodes.submit(route, req.model_dump(mode="json"))
        return self.submit_request(route, req)

    def cancel_job(self, job_uuid: str, logged_as: str = "cancelled") -> None:
        """Cancel a job whatever runs it: every part of a multi-node job, or a job waiting for nodes. The
        service's log names its end `logged_as` (an OpenAI job's pause: "paused")."""
        if self._placed_by_nodes(job_uuid):
            self.nodes.cancel(job_uuid)
        else:
            self.jobs.cancel(job_uuid, logged_as=logged_as)

    def resume_job(self, job_uuid: str) -> JobRecord:
        """Run a failed or cancelled job again from its newest checkpoint, through its launcher: every part
        of a multi-node job; a slurm or ray job is submitted to its scheduler again."""
        if self.nodes is not None and self.nodes.is_distributed(job_uuid):
            return self.nodes.resume(job_uuid)
        return self.jobs.resume(job_uuid)

    def job_view(self, job_uuid: str) -> dict[str, Any]:
        """The job's status view (with its parts' states when it spans nodes, or its wait for them)."""
        return self.nodes.view(job_uuid) if self._placed_by_nodes(job_uuid) else self.view(job_uuid)

    def list_jobs(self) -> list[dict[str, str]]:
        """Every job: the JobManager's records, then the jobs still waiting for nodes."""
        if self.nodes is not None:
            return self.nodes.list_jobs()
        return [{"job_uuid": j.job_uuid, "status": j.status} for j in self.jobs.store.list()]

    # -- datasets ------------------------------------------------------------------------------------
    def dataset_path(self, dataset_id: str) -> Path:
        """Where the dataset `dataset_id` of the current user lies: each member's names are its own
        (datasets/users/NAME/); the service's and the single admin's lie in datasets/ itself."""
        with client_errors():
            check_name(dataset_id, "dataset_id")
        return self.user_datasets_dir() / f"{dataset_id}.jsonl"

    def user_datasets_dir(self, owner: str | None = None) -> Path:
        """The datasets folder of `owner` (None: the current request's user, or the service's own)."""
        owner = owner or access.owner_name()
        if owner is None or owner == access.LOCAL_ADMIN.name:
            return self.datasets_dir
        return self.datasets_dir / "users" / owner

    def teacher_outputs_dir(self, job_uuid: str) -> Path:
        """Where a local teacher task writes its outputs."""
        check_job_uuid(job_uuid)
        return self.data_dir / "teacher_outputs" / job_uuid

    def uploaded_outputs_dir(self, outputs_id: str) -> Path:
        """Where teacher outputs pushed by a coordinator land: apart from local teacher tasks' outputs."""
        self.dataset_path(outputs_id)  # the same name rules
        return self.data_dir / "uploaded_teacher_outputs" / outputs_id

    def dataset_rows(self, dataset_id: str, field: str) -> Iterator[dict[str, Any]]:
        path = self.dataset_path(dataset_id)
        if not path.exists():
            raise BadRequest(f"{field}: no dataset {dataset_id!r} on this service (upload its rows first)")
        return self._iter_jsonl(path, field)

    @staticmethod
    def _iter_jsonl(path: Path, field: str) -> Iterator[dict[str, Any]]:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise BadRequest(f"{field}: line {n} of the dataset is not JSON ({e})") from None

    def list_datasets(self) -> list[dict[str, Any]]:
        return [{"dataset_id": p.stem, "bytes": p.stat().st_size} for p in sorted(self.user_datasets_dir().glob("*.jsonl"))]

    # -- jobs ----------------------------------------------------------------------------------------
    def _command(self, spec: JobSpec, files: RunFiles) -> list[str]:
        opts = TorchRunOptions.model_validate_json((files.dir / "torchrun.json").read_text())
        return torchrun_command(spec, files, opts)

    def local_load(self) -> int:
        """Jobs running on this host: in progress, not handed to a scheduler that runs them elsewhere."""
        return sum(1 for job in self.jobs.store.list(statuses=("in_progress",), everyone=True)
                   if not runs_elsewhere(job.launcher))

    def torch_run_options(self, overrides: dict[str, Any] | None, trusted: bool = False) -> TorchRunOptions:
        """The job's torchrun options: the service's, with a request's overrides. Rendezvous placement
        (node rank, master address and port, local address) comes only from a coordinator (`trusted`):
        a client-chosen master would join the job's ranks to a store the client runs."""
        overrides = overrides or {}
        if not isinstance(overrides, dict):
            raise BadRequest("training_config.torch_run_config: must be an object")
        for key in overrides:  # a typo is an unknown key, not a placement key
            if key not in TorchRunOptions.model_fields:
                raise BadRequest(f"training_config.torch_run_config.{str(key)[:100]}: "
                                 f"{unknown_key_message(key, CLIENT_TORCH_RUN_KEYS)}")
        if not trusted:
            placement = sorted(set(overrides) - CLIENT_TORCH_RUN_KEYS)
            if placement:
                raise BadRequest(f"training_config.torch_run_config: {placement} are set by the coordinator, not by "
                                 f"clients (clients may set {sorted(CLIENT_TORCH_RUN_KEYS)})")
        try:
            opts = TorchRunOptions(**{**self.config.torch_run.model_dump(), **overrides})
        except ValidationError as e:
            raise BadRequest(_validation_message(e, "training_config.torch_run_config")) from None
        if not trusted and opts.launcher is not None and opts.launcher not in self.config.launchers.enabled:
            raise BadRequest(f"training_config.torch_run_config.launcher: {opts.launcher!r} is not enabled on this "
                             f"service (enabled: {self.config.launchers.enabled}; see --launchers-config)")
        if opts.nproc_per_node > self.config.max_nproc_per_node:
            raise BadRequest(f"training_config.torch_run_config.nproc_per_node: {opts.nproc_per_node} is over this "
                             f"service's limit of {self.config.max_nproc_per_node}")
        return opts

    def fsdp_options(self, overrides: dict[str, Any] | None) -> FsdpSpec:
        if overrides is not None and not isinstance(overrides, dict):
            raise BadRequest("training_config.fsdp_config: must be an object")
        try:
            return FsdpSpec(**{**self.config.fsdp.model_dump(), **(overrides or {})})
        except ValidationError as e:
            raise BadRequest(_validation_message(e, "training_config.fsdp_config")) from None

    def submit(self, *, job_uuid: str, method: str, model: str, training_config: TrainingConfig,
               algorithm_config: Any, logger_config: dict[str, Any], checkpoint_dir: str | None,
               rows: list[dict] | None, validation_rows: list[dict] | None, output_dir: Path | None = None,
               use_fsdp: bool = True, result_name: str | None = None, trusted: bool = False) -> dict[str, Any]:
        check_job_uuid(job_uuid)
        if self.jobs.store.exists(job_uuid):
            raise Conflict(f"job_uuid: a job named {job_uuid!r} already exists")
        torch_run = self.torch_run_options(training_config.torch_run_config, trusted=trusted)
        world_size = torch_run.nproc_per_node * torch_run.nnodes
        fsdp = self.fsdp_options(training_config.fsdp_config) if use_fsdp or world_size > 1 else None
        launcher_name = self.launcher_of(torch_run)
        launcher = self.launcher(launcher_name)
        # What the job's hosts cannot run is refused here; a launcher that runs the job elsewhere leaves the
        # host-dependent checks (GPUs, kernels) to the node, which makes them when the job loads.
        launcher.check(torch_run, fsdp, scheduling_spec(training_config).resources)
        dc = data_config_of(training_config)
        train_rows = rows if rows is not None else self.dataset_rows(dc.dataset_id, "training_config.data_config.dataset_id")
        val_rows = validation_rows
        if val_rows is None and dc.validation_dataset_id:
            val_rows = self.dataset_rows(dc.validation_dataset_id, "training_config.data_config.validation_dataset_id")
        # The run dir's copies of the rows are claimed first: past the data dir's or the user's quota, a 507.
        with DiskQuota.of(self.config).reservation(f"job {job_uuid}") as claim, self.jobs.reserve(job_uuid) as run_dir:
            claim.expect(rows_bytes(self, dc, rows, validation_rows))
            spec = prepare_job(
                job_uuid=job_uuid, run_dir=run_dir, method=method, model=model, training_config=training_config,
                algorithm_config=algorithm_config, logger_config=logger_config, checkpoint_dir=checkpoint_dir,
                defaults=self.defaults, train_rows=train_rows, validation_rows=val_rows, fsdp=fsdp,
                output_dir=str(output_dir) if output_dir else None, result_name=result_name,
                check_host=not launcher.runs_elsewhere,
            )
            self._start(spec, run_dir, torch_run, launcher_name)
        return {"job_uuid": job_uuid}

    def submit_teacher(self, *, job_uuid: str, model: str, rows: Any, output_dir: Path, top_k: int | None,
                       max_new_tokens: int, generation_batch_size: int, scheduling: SchedulingSpec,
                       launcher: str | None) -> dict[str, Any]:
        """Submit a teacher task (one process: generation, no FSDP) through the same checks and start as a
        training job."""
        check_job_uuid(job_uuid)
        if self.jobs.store.exists(job_uuid):
            raise Conflict(f"job_uuid: a job named {job_uuid!r} already exists")
        torch_run = self.torch_run_options({"nproc_per_node": 1, "launcher": launcher})
        launcher_name = self.launcher_of(torch_run)
        self.launcher(launcher_name).check(torch_run, None, scheduling.resources)
        model = self.resolve_model(model, "teacher.model")
        with self.jobs.reserve(job_uuid) as run_dir:
            spec = teacher_job_spec(job_uuid=job_uuid, run_dir=run_dir, model=model, rows=rows,
                                    output_dir=str(output_dir), top_k=top_k, max_new_tokens=max_new_tokens,
                                    generation_batch_size=generation_batch_size, scheduling=scheduling)
            self._start(spec, run_dir, torch_run, launcher_name)
        return {"job_uuid": job_uuid}

    def _start(self, spec: JobSpec, run_dir: Path, torch_run: TorchRunOptions, launcher_name: str) -> None:
        """Queue a job whose spec is written: its torchrun options beside it, what it was given in
        resources_allocated, and the scheduling settings its launcher cannot honour in not_applied."""
        (run_dir / "torchrun.json").write_text(torch_run.model_dump_json())
        resources = {
            "method": spec.method,
            "model": spec.model,
            "world_size": torch_run.nproc_per_node * torch_run.nnodes,
            "nnodes": torch_run.nnodes,
            "nproc_per_node": torch_run.nproc_per_node,
            "node_rank": torch_run.node_rank,
            "device_type": device_type(),
            "backend": backend(),
            "fsdp": spec.fsdp.model_dump() if spec.fsdp else None,
            "launcher": launcher_name,
        }
        spec.not_applied.update(self.launcher(launcher_name).unhonoured(spec))
        self.jobs.submit(spec, resources=resources, launcher=launcher_name)

    def launcher_of(self, opts: TorchRunOptions) -> str:
        """The JobManager launcher of a job on this service: the one it asks for, else the service's default.
        `nodes` jobs are placed by this service's registry (spans_registry_nodes); each node runs its part
        with the nodes launcher's `part_launcher` (local)."""
        name = opts.launcher or self.config.launchers.default
        return NodesLauncher.part_launcher if name == NodesLauncher.name else name

    def spans_registry_nodes(self, opts: TorchRunOptions) -> bool:
        """Whether this service places the job on its registered nodes (the `nodes` launcher): a job on
        more than one node whose launcher is this service's own."""
        name = opts.launcher or self.config.launchers.default
        return opts.nnodes > 1 and name in (LocalLauncher.name, NodesLauncher.name)

    def submit_request(self, route: str, request: Any, trusted: bool = False) -> dict[str, Any]:
        """Submit a supervised-fine-tune or preference-optimize request (a model or its JSON dict);
        `trusted`: a coordinator's part of a multi-node job, which carries the rendezvous placement."""
        if route == "preference-optimize":
            req = PreferenceOptimizeRequest.model_validate(request)
            model, result_name = preference_target(req.finetuned_model, req.model)
        else:
            req = SupervisedFineTuneRequest.model_validate(request)
            model, result_name = req.model, None
        method = method_of(route, req.algorithm_config)
        if req.part_of is not None and not trusted:
            raise BadRequest("part_of: set only by a coordinator (on its node-authenticated parts route)")
        return self.submit(
            job_uuid=req.job_uuid, method=method, model=model, training_config=req.training_config,
            algorithm_config=req.algorithm_config, logger_config=req.logger_config,
            checkpoint_dir=req.checkpoint_dir, rows=req.rows, validation_rows=req.validation_rows,
            result_name=result_name, trusted=trusted,
        )

    def view(self, job_uuid: str) -> dict[str, Any]:
        return self.jobs.job_view(job_uuid)

    def resolve_model(self, model: str, field: str) -> str:
        """A request's model reference (a local directory or a Hugging Face hub id) as a local causal-LM
        directory inside the allowed model roots; raises ValueError naming `field`."""
        return resolve_model(model, field, self.defaults)
