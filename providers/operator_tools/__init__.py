"""The service's tools for the people who run it: the dashboard at /dashboard and Prometheus /metrics.
An add-on of the FSDP service: the dashboard's page and API live in providers/dashboard/ (the CLI serves
them for a data dir too); this package binds them, and the metrics, to the service's core.

`install` is the one call `create_app` makes. Environment switches (both default on):
TRL_FSDP_DASHBOARD=0 and TRL_FSDP_METRICS=0 leave them out (benchmarks/bench_operator_tools.py uses
them to measure what they cost).
"""

from __future__ import annotations

import os
from typing import Any

import httpx
from fastapi import Depends

from ..dashboard import JobsSource, dashboard_router
from ..dashboard.sources import read_pipeline
from ..jobs.store import UnknownJobError
from ..remote_fsdp.service.core import ServiceCore
from ..remote_fsdp.service.jobs import FsdpJobService
from ..remote_fsdp.service.nodes import NodeRegistry
from ..remote_fsdp.service.users import require_admin
from .metrics import install_metrics


def _enabled(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


def service_source(service: FsdpJobService, registry: NodeRegistry, headers: dict[str, str]) -> JobsSource:
    """The dashboard's view of this service: its job store, node registry, pipelines and actions; `headers`:
    what calls to other nodes carry (the node token)."""

    def nodes() -> list[dict[str, Any]]:
        return [{**n.model_dump(), "local": n.node_id == registry.local.node_id} for n in registry.nodes()]

    source = JobsSource(store=service.jobs.store, data_dir=service.data_dir, view=service.job_view, nodes=nodes,
                        cancel=service.cancel_job, resume=service.resume_job, kind="service")

    def task_status(task: dict[str, Any]) -> dict[str, Any]:
        node_id = task.get("node_id")
        if node_id is None:
            return {"status": "scheduled"}
        if node_id == registry.local.node_id:
            try:
                return {k: v for k, v in source.summary(task["job_uuid"]).items() if k != "job_uuid"}
            except UnknownJobError:
                return {"status": "scheduled"}
        try:  # a task placed on another node: ask it
            url = registry.get(node_id).url
            r = httpx.get(f"{url}/v1/post-training/job/status", params={"job_uuid": task["job_uuid"]},
                          headers=headers, timeout=2.0)
            r.raise_for_status()
            res = r.json().get("resources_allocated") or {}
            return {"status": r.json()["status"], "step": res.get("step"), "total_steps": res.get("total_steps"),
                    "last_loss": res.get("last_loss"), "error": res.get("error")}
        except (httpx.HTTPError, KeyError, ValueError) as e:
            return {"status": "unknown", "error": f"node {node_id} did not answer: {e}"}

    def pipeline_view(pipeline_id: str) -> dict[str, Any]:
        state = read_pipeline(service.data_dir, pipeline_id)
        for task in [state["teacher"], *state["students"]]:
            task.update(task_status(task))
        return state

    source.pipeline_view = pipeline_view
    return source


def install(app, core: ServiceCore) -> None:
    """Add /dashboard (page public; data behind the client token; cancel/resume only when a token is set)
    and /metrics (behind the client token) to the service's app."""
    service, registry, auth = core.service, core.registry, core.auth
    keys = core.config.user_keys() is not None
    if _enabled("TRL_FSDP_METRICS"):  # every user's jobs in one series: admins only
        install_metrics(app, service.jobs.store, registry, [*auth, Depends(require_admin)])
    if _enabled("TRL_FSDP_DASHBOARD"):
        source = service_source(service, registry, core.peer_headers)
        source.names = core.job_names  # filled by the add-ons mounted after this one (openai_ft)
        source.marks = core.job_marks
        app.include_router(dashboard_router(source, auth=auth, actions=keys, token_required=keys), prefix="/dashboard")
