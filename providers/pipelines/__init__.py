"""Teacher-student pipelines, an add-on of the FSDP service: one teacher task, N students distilled from
its cached outputs, a merge; over the service's nodes.

    teacher_student.py   the request models and Pipelines (placement, pipeline.json, resumed after a restart)
    routes.py            /v1/pipelines, /v1/teacher-tasks, /v1/student-tasks, /v1/adapters/merge,
                         /v1/teacher-outputs (node token)
"""

from __future__ import annotations

from ..remote_fsdp.service.core import ServiceCore
from .routes import pipelines_router, teacher_outputs_router
from .teacher_student import Pipelines


def install(app, core: ServiceCore) -> None:
    """Run the service's pipelines (those a restart interrupted go on) and mount their routes."""
    pipelines = Pipelines(core.service, core.registry, core.peer_headers, max_running=core.config.max_pipelines)
    core.service.own_folder(pipelines.root, pipelines.owner_of)  # a pipeline's folder: its submitter's
    core.service.own_folder(core.service.data_dir / "merged" / "users", lambda parts: parts[0] if parts else None)
    core.on_shutdown.append(pipelines.stop.set)
    core.upload_prefixes.append("/v1/teacher-outputs/")  # tar.gz archives, not JSON bodies
    app.include_router(pipelines_router(core.service, pipelines), prefix="/v1", dependencies=core.auth)
    app.include_router(teacher_outputs_router(core.service), prefix="/v1", dependencies=core.node_only)
