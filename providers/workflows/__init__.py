"""The adapter workflow, an add-on of the FSDP service: OpenAI-compatible chat over local checkpoints,
data enhancement, validation, export, and the one-call enhance -> train -> validate -> export.

    tasks.py    the request models, WorkflowTasks (task.json per task, resumed after a restart), ModelRefs
    routes.py   the chat router's mounting and the task routes (/v1/data-enhancement, /v1/validations,
                /v1/exports, /v1/workflows)
"""

from __future__ import annotations

from ..remote_fsdp.service.core import ServiceCore
from .routes import include_workflow_routes


def install(app, core: ServiceCore) -> None:
    """Mount the chat API and the workflow task routes behind the client token."""
    include_workflow_routes(app, core.service, core.auth, core.internal_key)
