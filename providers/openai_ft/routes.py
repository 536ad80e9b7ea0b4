"""The OpenAI files and fine-tuning routes: each a thin call into `OpenAIFineTuning` (api.py), its errors in
OpenAI's shape (errors.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import FileResponse

from .api import OpenAIFineTuning, page
from .errors import ApiError, openai_errors
from .store import LIST_FILES_LIMIT


def openai_ft_router(api: OpenAIFineTuning) -> APIRouter:
    """POST/GET /files, GET/DELETE /files/{id}, GET /files/{id}/content; POST/GET /fine_tuning/jobs,
    GET /fine_tuning/jobs/{id}, POST .../cancel|pause|resume, GET .../events, GET .../checkpoints."""
    r = APIRouter()
    state = api.state

    @r.post("/files")
    async def create_file(request: Request) -> dict[str, Any]:
        with openai_errors("file"):
            return await api.upload(request)

    @r.get("/files")
    def list_files(after: str | None = Query(None, max_length=200),
                   limit: int = Query(LIST_FILES_LIMIT, ge=1, le=LIST_FILES_LIMIT),
                   purpose: str | None = Query(None, max_length=200)) -> dict[str, Any]:
        files, has_more = state.files_page(after, limit, purpose)
        return {"object": "list", "data": [api.file_object(m) for m in files], "has_more": has_more}

    @r.get("/files/{file_id}")
    def get_file(file_id: str) -> dict[str, Any]:
        with openai_errors("file_id"):
            return api.file_object(state.get_file(file_id))

    @r.get("/files/{file_id}/content")
    def file_content(file_id: str) -> FileResponse:
        with openai_errors("file_id"):
            meta = state.get_file(file_id)
        media = "text/csv" if meta["purpose"] == "fine-tune-results" else "application/jsonl"
        return FileResponse(state.blob(file_id), media_type=media, filename=meta["filename"])

    @r.delete("/files/{file_id}")
    def delete_file(file_id: str) -> dict[str, Any]:
        with openai_errors("file_id"):
            return api.delete_file(file_id)

    @r.post("/fine_tuning/jobs")
    def create_job(body: Any = Body(...)) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError(400, "body: must be a JSON object", None)
        with openai_errors():
            return api.create_job(body)

    @r.get("/fine_tuning/jobs")
    def list_jobs(after: str | None = None, limit: int = Query(20, ge=1, le=100)) -> dict[str, Any]:
        body = page(state.list_jobs(), after, limit)  # the page first: each job object reads its run dir
        body["data"] = [api.job_object(rec) for rec in body["data"]]
        return body

    @r.get("/fine_tuning/jobs/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        with openai_errors("fine_tuning_job_id"):
            return api.job_object(state.get_job(job_id))

    @r.post("/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str) -> dict[str, Any]:
        with openai_errors("fine_tuning_job_id"):
            return api.cancel(job_id)

    @r.post("/fine_tuning/jobs/{job_id}/pause")
    async def pause_job(job_id: str) -> dict[str, Any]:  # waits for the checkpoint on the event loop
        with openai_errors("fine_tuning_job_id"):
            return await api.pause(job_id)

    @r.post("/fine_tuning/jobs/{job_id}/resume")
    def resume_job(job_id: str) -> dict[str, Any]:
        with openai_errors("fine_tuning_job_id"):
            return api.resume(job_id)

    @r.get("/fine_tuning/jobs/{job_id}/events")
    def job_events(job_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=10000)) -> dict[str, Any]:
        with openai_errors("fine_tuning_job_id"):
            return page(api.events(state.get_job(job_id))[::-1], after, limit)

    @r.get("/fine_tuning/jobs/{job_id}/checkpoints")
    def job_checkpoints(job_id: str, after: str | None = None, limit: int = Query(10, ge=1, le=1000)) -> dict[str, Any]:
        with openai_errors("fine_tuning_job_id"):
            items = api.checkpoints(state.get_job(job_id))
        body = page(items, after, limit)
        body["first_id"] = body["data"][0]["id"] if body["data"] else None
        body["last_id"] = body["data"][-1]["id"] if body["data"] else None
        return body

    return r
