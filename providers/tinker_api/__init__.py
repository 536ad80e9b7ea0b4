"""The Tinker API, an add-on of the FSDP service: the official `tinker` SDK's calls (sessions, resident LoRA
models, forward_backward / optim_step, sampling, tinker:// checkpoints, futures) under /api/v1, behind the
same keys as the other routes (the SDK sends its key as X-API-Key).

    model.py    SharedBase: a base and its models' LoRA adapters (each with AdamW); forward_backward,
                optim_step, sample, save/load on one adapter (tensors only)
    wire.py     the SDK's protobuf messages in and out
    worker.py   BaseWorker (one base's thread in the service: every request on it in arrival order), the
                BaseProcess it hands them to, and the FutureTable
    process.py  a base's worker process (forked from the job zygote): holds the SharedBase, runs requests
    channel.py  the messages between the two: a JSON header and bytes, length-prefixed
    limits.py   TinkerLimits: each bound and time-out, declared once (--tinker-config)
    service.py  sessions, models, samplers and their records on disk, eviction and restore, tinker:// paths,
                ownership and limits
    routes.py   the routes
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..remote_fsdp.service.core import ServiceCore

PREFIX = "/api/v1"


def install(app, core: ServiceCore) -> None:
    """Mount the routes behind the client keys; at shutdown every model in memory is saved (a restarted
    service restores it on its next request). What sessions write counts against their users' disk quotas."""
    # Here, not at the top: the SDK's protobuf module and torch load only in a service that mounts this.
    from ..remote_fsdp.service.quota import quotas_of
    from ..remote_fsdp.service.security import DiskQuota
    from .routes import tinker_router
    from .service import TinkerService

    # Each base's process has a job's environment (the service's settings and secrets left out), so it is
    # forked from the jobs' own zygote.
    svc = TinkerService(core.config.data_path, core.service.resolve_model, core.config.tinker,
                        DiskQuota.of(core.config), child_env=core.service.jobs.job_env,
                        model_dirs=core.config.model_dirs)
    quotas = quotas_of(core.service)
    if quotas is not None:  # a user's checkpoints and resident saves count against its max_data_gb
        quotas.sources.append(svc.held_by_users)
    app.state.tinker = svc
    app.include_router(tinker_router(svc), prefix=PREFIX, dependencies=core.auth)
    core.on_shutdown.append(svc.shutdown)
