"""The Tinker API, an add-on of the FSDP service: the official `tinker` SDK's calls (sessions, resident LoRA
models, forward_backward / optim_step, sampling, tinker:// checkpoints, futures) under /api/v1, behind the
same keys as the other routes (the SDK sends its key as X-API-Key).

    model.py    TinkerModel: base + LoRA + AdamW; forward_backward, optim_step, sample, save/load (tensors only)
    wire.py     the SDK's protobuf messages in and out
    worker.py   ModelWorker (one resident model, requests in arrival order) and the FutureTable
    service.py  sessions, models, samplers, tinker:// paths, ownership and limits
    routes.py   the routes
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..remote_fsdp.service.core import ServiceCore

PREFIX = "/api/v1"


def install(app, core: ServiceCore) -> None:
    """Mount the routes behind the client keys; resident models stop with the service."""
    # Here, not at the top: the SDK's protobuf module and torch load only in a service that mounts this.
    from .routes import tinker_router
    from .service import TinkerService

    svc = TinkerService(core.config.data_path, core.service.resolve_model)
    app.state.tinker = svc
    app.include_router(tinker_router(svc), prefix=PREFIX, dependencies=core.auth)
    core.on_shutdown.append(svc.shutdown)
