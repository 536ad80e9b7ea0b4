"""The dashboard's routes: the page (static files) and the JSON it polls, over one `JobsSource`.

Mounted at /dashboard by the FSDP service and by `trl-post-training dashboard`. The page and its
static files are public (they hold no data); every /api route takes the caller's `auth` dependencies
(the service's bearer token when one is configured). Cancel and resume exist only with `actions=True`:
the service enables them when it has a token, so a dashboard nobody logged into never changes a job.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import FileResponse, RedirectResponse

from .. import access
from ..jobs.store import UnknownJobError
from ..training.methods import METHODS
from .sources import TASK_REPORTS, JobsSource, log_path, read_metrics, tail_lines

STATIC = Path(__file__).resolve().parent / "static"
# The page runs only its own files (no inline script, no CDN) and cannot be framed (its buttons act).
PAGE_HEADERS = {
    "cache-control": "no-cache",
    "content-security-policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                               "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
}


def _unknown(what: str, name: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"{what}: unknown {what} {name!r}")


def dashboard_router(source: JobsSource, auth: list[Depends] | None = None, actions: bool = True,
                     token_required: bool = False) -> APIRouter:
    """Routes for prefix /dashboard. `auth`: dependencies every data route must pass; `actions`: whether
    cancel/resume are offered (also requires the source to have them); `token_required`: tells the page
    to ask for the token before it polls."""
    r = APIRouter()
    api = APIRouter(dependencies=auth or [])
    can_act = actions and source.actions

    @r.get("", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("dashboard/")

    @r.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    @r.get("/static/{name:path}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        path = (STATIC / name).resolve()
        if not path.is_file() or STATIC not in path.parents:
            raise HTTPException(status_code=404, detail=f"no static file {name!r}")
        return FileResponse(path)

    @r.get("/api/info")  # public: what the page needs before it has a token
    async def info() -> dict[str, Any]:
        # each method's headline metric keys (`*`: any grader), which the compare view overlays
        return {"source": source.kind, "actions": can_act, "auth_required": token_required,
                "headlines": {name: list(m.headline) for name, m in METHODS.items()}}

    @api.get("/jobs")
    async def jobs() -> dict[str, Any]:
        user = access.current()  # who signed in: an admin's page names each job's owner
        viewer = {"name": user.name, "role": user.role} if user else None
        return {"data": source.jobs(), "viewer": viewer}

    @api.get("/jobs/{job_uuid}")
    async def job(job_uuid: str) -> dict[str, Any]:
        try:
            return source.job_page(job_uuid)
        except UnknownJobError:
            raise _unknown("job_uuid", job_uuid) from None

    def _run_dir(job_uuid: str) -> Path:
        try:
            return source.run_dir(job_uuid)
        except UnknownJobError:
            raise _unknown("job_uuid", job_uuid) from None

    @api.get("/jobs/{job_uuid}/metrics")
    async def metrics(job_uuid: str, since: int = Query(0, ge=0)) -> dict[str, Any]:
        """metrics.jsonl records from byte offset `since`; `next` is the offset for the next poll."""
        records, nxt = read_metrics(_run_dir(job_uuid), since)
        return {"job_uuid": job_uuid, "records": records, "next": nxt}

    @api.get("/jobs/{job_uuid}/logs")
    async def logs(job_uuid: str, rank: int | None = Query(None, ge=0), tail: int = Query(200, ge=1, le=5000)):
        path = log_path(_run_dir(job_uuid), rank)
        return {"job_uuid": job_uuid, "log_file": str(path), "log_lines": tail_lines(path, tail)}

    @api.get("/jobs/{job_uuid}/plots/{name}")
    async def plot(job_uuid: str, name: str) -> FileResponse:
        plots = _run_dir(job_uuid) / "plots"
        path = (plots / name).resolve()
        if path.parent != plots.resolve() or path.suffix != ".png" or not path.is_file():
            raise HTTPException(status_code=404, detail=f"name: job {job_uuid!r} has no plot {name!r}")
        return FileResponse(path)

    def _act(action, job_uuid: str) -> dict[str, Any]:
        if not can_act or action is None:
            raise HTTPException(status_code=403, detail="the dashboard is read-only here: configure an API token "
                                "(service --api-token, or `trl-post-training dashboard --token`) to cancel or resume")
        try:
            action(job_uuid)
        except UnknownJobError:
            raise _unknown("job_uuid", job_uuid) from None
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        return source.summary(job_uuid)

    @api.post("/jobs/{job_uuid}/cancel")
    async def cancel(job_uuid: str) -> dict[str, Any]:
        # cancel waits for the job's processes to stop: off the event loop
        return await asyncio.to_thread(_act, source.cancel, job_uuid)

    @api.post("/jobs/{job_uuid}/resume")
    async def resume(job_uuid: str) -> dict[str, Any]:
        return await asyncio.to_thread(_act, source.resume, job_uuid)

    @api.get("/nodes")
    async def nodes() -> dict[str, Any]:
        return {"data": source.nodes()}

    @api.get("/pipelines")
    async def pipelines() -> dict[str, Any]:
        return {"data": source.pipelines()}

    @api.get("/pipelines/{pipeline_id}")
    def pipeline(pipeline_id: str) -> dict[str, Any]:  # may ask other nodes: thread pool
        try:
            return source.pipeline(pipeline_id)
        except UnknownJobError:
            raise _unknown("pipeline_id", pipeline_id) from None

    @api.post("/pipelines/{pipeline_id}/cancel")
    def pipeline_cancel(pipeline_id: str) -> dict[str, Any]:
        if not can_act or source.cancel_pipeline is None:
            raise HTTPException(status_code=403, detail="the dashboard is read-only here")
        try:
            source.cancel_pipeline(pipeline_id)
        except UnknownJobError:
            raise _unknown("pipeline_id", pipeline_id) from None
        return source.pipeline(pipeline_id)

    @api.get("/tasks/{kind}")
    def tasks(kind: str) -> dict[str, Any]:  # reads files: thread pool
        try:
            return {"data": source.tasks(kind)}
        except UnknownJobError:
            raise HTTPException(status_code=404, detail=f"kind: unknown task kind {kind!r}; one of "
                                f"{sorted(TASK_REPORTS)}") from None

    @api.get("/tasks/{kind}/{task_id}")
    def task(kind: str, task_id: str) -> dict[str, Any]:
        try:
            return source.task(kind, task_id)
        except UnknownJobError:
            raise _unknown("task_id", f"{kind}/{task_id}") from None

    r.include_router(api, prefix="/api")
    return r
