"""The OpenAI fine-tuning API, an add-on of the FSDP service: files, fine-tuning jobs, events, checkpoints,
on the service's one job store (a job is also a post-training job named `ftjob-...`).

    POST/GET /files, GET/DELETE /files/{id}, GET /files/{id}/content
    POST/GET /fine_tuning/jobs, GET /fine_tuning/jobs/{id}, POST .../cancel|pause|resume, GET .../events|checkpoints
(under /v1/openai/v1, beside the chat API, and under /v1). The chat API serves `ft:` models and checkpoints.

    formats.py  upload validation (line and field of the first error), row conversion, statuses, auto values
    store.py    files' and jobs' OpenAI records (JSON state files)
    routes.py   the routes and OpenAIFineTuning (the job request -> the service's typed request)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..remote_fsdp.service.core import ServiceCore

PREFIXES = ("/v1/openai/v1", "/v1")


def install(app, core: ServiceCore) -> None:
    """Mount the routes behind the client token; uploads get the upload limit; `ft:` ids resolve in chat and
    are listed by GET /models."""
    # Here, not at the top: the file validators (formats.py) import without the service and its torch stack.
    from .api import OpenAIFineTuning
    from .errors import ApiError
    from .routes import openai_ft_router

    api = OpenAIFineTuning(core.service)
    roots = core.service.defaults.allowed_model_roots
    if roots is not None:  # the `ft:` models jobs continue from (made from the jobs' own records)
        roots.append(str(api.state.models_dir))
    # FTJOB_ID-final / FTJOB_ID-step-N: the fine-tuning job's (a job of the service's store, same id) owner's
    core.service.own_folder(api.state.models_dir, lambda parts: core.service.jobs.store.owner_of(parts[0][:30])
                            if parts else None)
    router = openai_ft_router(api)
    for prefix in PREFIXES:
        app.include_router(router, prefix=prefix, dependencies=core.auth)
        core.upload_prefixes.append(f"{prefix}/files")

    async def openai_error(_, exc: ApiError):
        return exc.response()

    app.add_exception_handler(ApiError, openai_error)
    core.job_names.append(api.job_name)
    core.job_marks.append(api.job_marks)
    tasks = getattr(app.state, "workflow_tasks", None)  # the chat API's model references (workflows add-on)
    if tasks is not None:
        tasks.refs.resolvers["ft"] = api.resolve_ft
        tasks.refs.listers.append(api.served_models)
