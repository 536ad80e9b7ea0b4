"""Routes of the adapter workflow: OpenAI-compatible chat over local checkpoints, data enhancement,
validation, export, and the one-call enhance -> train -> validate -> export pipeline.

    POST /v1/openai/v1/chat/completions, /v1/chat/completions     GET /v1/openai/v1/models, /v1/models
    POST /v1/data-enhancement   GET /v1/data-enhancement[/{id}[/artifacts|/files/{name}]]   POST .../{id}/cancel|resume
    POST /v1/validations        (same GET/cancel shapes)
    POST /v1/exports            (same)
    POST /v1/workflows          (same; the one-call pipeline, pipeline_results.json)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse

from .. import access
from ..cluster.nodes import models_on_disk
from ..enhance.roles import role_target
from ..export.hub import hub_target
from ..remote_fsdp.service.jobs import FsdpJobService
from ..serving.engine import ModelCache
from ..serving.openai_api import ChatLimits, chat_router
from ..training.methods import SERVABLE
from .tasks import (
    EnhanceRequest,
    ExportRequest,
    ModelRefs,
    ValidationRequest,
    WorkflowRequest,
    WorkflowTasks,
    train_model,
)


def _task_routes(r: APIRouter, path: str, kind: str, tasks: WorkflowTasks) -> None:
    @r.get(path, name=f"list_{kind}")
    def list_tasks() -> dict[str, Any]:
        return {"data": tasks.list(kind)}

    @r.get(path + "/{task_id}", name=f"get_{kind}")
    def get_task(task_id: str) -> dict[str, Any]:
        return tasks.get(kind, task_id)

    @r.post(path + "/{task_id}/cancel", name=f"cancel_{kind}")
    def cancel_task(task_id: str) -> dict[str, Any]:
        return tasks.cancel(kind, task_id)

    @r.get(path + "/{task_id}/artifacts", name=f"artifacts_{kind}")
    def task_artifacts(task_id: str) -> dict[str, Any]:
        return tasks.artifacts(kind, task_id)

    @r.get(path + "/{task_id}/files/{name:path}", name=f"file_{kind}")
    def task_file(task_id: str, name: str) -> FileResponse:
        return FileResponse(tasks.file(kind, task_id, name))


def include_workflow_routes(app: FastAPI, service: FsdpJobService, dependencies: list, internal_key: str | None,
                            cache_size: int | None = None) -> WorkflowTasks:
    """Mount the workflow routes on the service app (behind `dependencies`, the bearer-token check).
    The chat API keeps `cache_size` models loaded (env TRL_FSDP_SERVED_MODELS, default 2)."""
    config = service.config
    refs = ModelRefs(service)
    cache = ModelCache(cache_size or int(os.environ.get("TRL_FSDP_SERVED_MODELS", "2")))
    local_url = f"http://{config.node_address}:{config.port}/v1/openai/v1"
    outbound = config.outbound  # the only endpoints and Hub settings requests may pick from
    tasks = WorkflowTasks(service, refs, local_url, internal_key)
    service.own_folder(tasks.root, tasks.owner_of)  # a task's folder (and what it made there): its submitter's
    app.state.workflow_tasks = tasks

    def base_model(job) -> str | None:
        """The model a job trained from, as its spec names it (None when the spec is unreadable)."""
        try:
            return json.loads((Path(job.run_dir) / "spec.json").read_text())["model"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def available_models() -> list[str]:
        done = [j for j in service.jobs.store.list(statuses=("completed",)) if j.method in SERVABLE]
        user = access.current()
        # A model loaded from the data dir (a job's checkpoint, an `ft:` model's files) has an id below: its path
        # would show the server's layout. Models the operator's roots hold keep their path as their id.
        inside = (config.data_path, config.shared_path)

        def outside(path: str) -> bool:
            return not any(Path(path).is_relative_to(d) for d in inside)

        loaded = [m for m in cache.loaded() if outside(m)] if user is None or user.is_admin else []
        # each job's base beside its result: a client that registers listed models only (Llama Stack's
        # remote::vllm) can then answer with both, the comparison an evaluation makes
        bases = [b for b in map(base_model, done) if b and outside(b)]
        # the operator's --model-dir models too: any of them (a judge, a base) can be registered before a job
        listed = [*loaded, *(f"job:{j.job_uuid}" for j in done), *bases, *models_on_disk(config.model_dirs)]
        return list(dict.fromkeys(listed + [m for lister in refs.listers for m in lister()]))

    chat = chat_router(lambda model: refs.resolve(model, "model"), cache, available_models,
                       ChatLimits(config.chat_workers, config.chat_queue, config.chat_max_tokens))
    app.include_router(chat, prefix="/v1/openai/v1", dependencies=dependencies)
    app.include_router(chat, prefix="/v1", dependencies=dependencies)

    r = APIRouter()

    def check_roles(config, field: str) -> None:
        """Each role names a declared endpoint (and no URL or key of its own) or a model this service can
        load: a 400 now, before anything is stored or called, not failed rows later."""
        roles = {"student": config.student, "teacher": config.teacher, "judge.role": getattr(config.judge, "role", None)}
        for name, role in roles.items():
            if role is None:
                continue
            role_target(f"{field}.{name}", role, outbound.endpoints, local_url, None)
            if role.endpoint is None:
                refs.resolve(role.model, f"{field}.{name}.model")

    def check_export(settings, field: str) -> None:
        """A Hub push goes only where the operator allows (namespace, visibility): a 400 before any work."""
        if settings is not None and settings.hub is not None:
            hub_target(settings.hub, outbound.hub, f"{field}hub")

    def rows_of(req) -> list[dict]:
        return req.rows if req.rows is not None else list(service.dataset_rows(req.dataset_id, "dataset_id"))

    @r.post("/data-enhancement")
    def create_enhancement(req: EnhanceRequest) -> dict[str, Any]:
        check_roles(req.config, "config")
        return tasks.create("enhancements", req.enhancement_id, req, rows_of(req))

    @r.post("/data-enhancement/{task_id}/resume")
    def resume_enhancement(task_id: str) -> dict[str, Any]:
        return tasks.resume("enhancements", task_id)

    _task_routes(r, "/data-enhancement", "enhancements", tasks)

    @r.post("/validations")
    def create_validation(req: ValidationRequest) -> dict[str, Any]:
        refs.resolve(req.model, "model")  # a bad reference is a 400 now, not a failed task later
        return tasks.create("validations", req.validation_id, req)

    _task_routes(r, "/validations", "validations", tasks)

    @r.post("/exports")
    def create_export(req: ExportRequest) -> dict[str, Any]:
        refs.resolve(req.model, "model")
        check_export(req, "")
        return tasks.create("exports", req.export_id, req)

    _task_routes(r, "/exports", "exports", tasks)

    @r.post("/workflows")
    def create_workflow(req: WorkflowRequest) -> dict[str, Any]:
        check_roles(req.enhance, "enhance")
        check_export(req.export, "export.")
        refs.resolve(train_model(req), "train.model")
        return tasks.create("workflows", req.workflow_id, req, rows_of(req))

    _task_routes(r, "/workflows", "workflows", tasks)
    app.include_router(r, prefix="/v1", dependencies=dependencies)
    return tasks
