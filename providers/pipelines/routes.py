"""Routes of the teacher-student pipelines: the whole pipeline as one call, and its steps as separate calls.

    POST /v1/pipelines/teacher-student   GET /v1/pipelines[/{pipeline_id}]   POST /v1/pipelines/{id}/cancel
    POST /v1/teacher-tasks   POST /v1/student-tasks   POST /v1/adapters/merge          (client token)
    PUT /v1/teacher-outputs/{outputs_id}   a coordinator pushes teacher outputs to this node (node token)
"""

from __future__ import annotations

import asyncio
import json
import shutil
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from .. import access
from ..errors import BadRequest, Conflict, client_errors
from ..api.requests import FINITE
from ..training.spec import SAFE_NAME
from ..remote_fsdp.service.jobs import FsdpJobService
from ..remote_fsdp.service.routes import declared_length
from ..remote_fsdp.service.security import ArchiveError, DiskQuota, extract_archive, temp_path
from ..training.data import read_shards
from .teacher_student import PipelineRequest, Pipelines, StudentConfig, TeacherTaskConfig


class TeacherTaskRequest(BaseModel):
    model_config = FINITE
    job_uuid: str = Field(pattern=SAFE_NAME)
    teacher: TeacherTaskConfig
    dataset_id: str | None = None
    rows: list[dict[str, Any]] | None = None


class StudentTasksRequest(BaseModel):
    model_config = FINITE
    teacher_task: str | None = None  # job_uuid of a completed teacher task on this service
    teacher_outputs: str | None = None  # or the id of teacher outputs uploaded to PUT /v1/teacher-outputs/{id}
    prefix: str | None = Field(None, pattern=SAFE_NAME)  # job_uuid: PREFIX-student-NAME
    students: list[StudentConfig] = Field(min_length=1)


class MergeRequest(BaseModel):
    model_config = FINITE
    job_uuids: list[str] = Field(min_length=2, max_length=64)  # completed PEFT jobs
    output_name: str = Field(pattern=SAFE_NAME)
    method: str = "linear"
    weights: list[float] | None = None


def pipelines_router(service: FsdpJobService, pipelines: Pipelines) -> APIRouter:
    """Teacher-student pipelines as one call, and their steps as separate calls."""
    r = APIRouter()

    @r.post("/pipelines/teacher-student")
    def create_pipeline(req: PipelineRequest) -> dict[str, Any]:
        return pipelines.submit(req)

    @r.get("/pipelines")
    def list_pipelines() -> dict[str, Any]:
        return {"data": pipelines.list()}

    @r.get("/pipelines/{pipeline_id}")
    def pipeline_status(pipeline_id: str) -> dict[str, Any]:
        return pipelines.get(pipeline_id)

    @r.post("/pipelines/{pipeline_id}/cancel")
    def cancel_pipeline(pipeline_id: str) -> None:
        pipelines.cancel(pipeline_id)

    @r.post("/teacher-tasks")
    def create_teacher_task(req: TeacherTaskRequest) -> dict[str, str]:
        if (req.rows is None) == (req.dataset_id is None):
            raise BadRequest("dataset_id/rows: give exactly one")
        if service.jobs.store.exists(req.job_uuid):
            raise Conflict(f"job_uuid: a job named {req.job_uuid!r} already exists")
        rows = req.rows if req.rows is not None else service.dataset_rows(req.dataset_id, "dataset_id")
        outputs = service.teacher_outputs_dir(req.job_uuid)
        pipelines.create_teacher_task(req.job_uuid, req.teacher, rows, outputs)
        return {"job_uuid": req.job_uuid, "teacher_outputs_dir": str(outputs)}

    @r.post("/student-tasks")
    def create_student_tasks(req: StudentTasksRequest) -> dict[str, list[str]]:
        if (req.teacher_task is None) == (req.teacher_outputs is None):
            raise BadRequest("teacher_task/teacher_outputs: give exactly one")
        if req.teacher_task is not None:
            teacher = service.jobs.store.get(req.teacher_task)
            if teacher.method != "teacher" or teacher.status != "completed":
                raise BadRequest(f"teacher_task: {req.teacher_task!r} is a {teacher.status} {teacher.method} job, "
                                 "not a completed teacher task")
            outputs = service.teacher_outputs_dir(req.teacher_task)
        else:
            outputs = service.uploaded_outputs_dir(req.teacher_outputs)
        if not (outputs / "teacher_task.json").exists():
            raise BadRequest(f"teacher_outputs: no teacher outputs named {req.teacher_outputs!r} on this service")
        answered = [{"prompt": r["prompt"], "completion": r["completion"]} for r in read_shards(outputs)]
        prefix = req.prefix or req.teacher_task or req.teacher_outputs
        job_uuids = [f"{prefix}-student-{s.name}" for s in req.students]
        for job_uuid, s in zip(job_uuids, req.students):
            pipelines.create_student_task(job_uuid, s, outputs, answered,
                                          service.runs_dir / job_uuid / "checkpoints")
        return {"job_uuids": job_uuids}

    @r.post("/adapters/merge")
    def merge(req: MergeRequest) -> dict[str, Any]:
        finals = []
        for job_uuid in req.job_uuids:
            view = service.view(job_uuid)
            if view["status"] != "completed" or not view["checkpoints"]:
                raise BadRequest(f"job_uuids: {job_uuid!r} is {view['status']}, not a completed job")
            finals.append(view["checkpoints"][-1]["path"])
        out = merged_dir(service) / req.output_name
        if out.exists():
            raise Conflict(f"output_name: a merged adapter named {req.output_name!r} already exists")
        with client_errors():  # weights that do not fit the adapters, a method peft does not have
            from ..training.merge import merge_adapters  # torch: imported when a merge runs

            merged = merge_adapters(finals, out, req.weights, req.method)
        return {"path": str(out), **merged}

    return r


def merged_dir(service: FsdpJobService):
    """Where the current user's merged adapters go: a member's in merged/users/NAME (its own folder)."""
    user = access.current()
    root = service.data_dir / "merged"
    return root / "users" / user.name if user is not None and not user.is_admin else root


def teacher_outputs_router(service: FsdpJobService) -> APIRouter:
    """Teacher outputs a coordinator pushes to this node for its students (node token)."""
    r = APIRouter()

    @r.put("/teacher-outputs/{outputs_id}")
    async def upload_teacher_outputs(outputs_id: str, request: Request) -> dict[str, Any]:
        """A teacher task's outputs (a tar.gz of its directory), streamed to disk, then extracted off the
        event loop into a new directory of its own (uploads never share a directory with local outputs)."""
        dest = service.uploaded_outputs_dir(outputs_id)
        if dest.exists():
            raise Conflict(f"outputs_id: teacher outputs named {outputs_id!r} were uploaded already")
        archive = temp_path(dest.parent, outputs_id)
        cfg = service.config
        # The archive and what it extracts to are claimed from the data dir's quota (507 past it).
        with DiskQuota.of(cfg).reservation(f"teacher outputs {outputs_id}") as quota:
            try:
                quota.expect(declared_length(request))
                with open(archive, "wb") as f:
                    async for chunk in request.stream():
                        quota.add(len(chunk))
                        f.write(chunk)
                try:
                    await asyncio.to_thread(extract_archive, archive, dest, cfg.max_archive_mb << 20,
                                            cfg.max_archive_members, quota)
                except ArchiveError as e:
                    raise BadRequest(f"body: {e}") from None
            finally:
                archive.unlink(missing_ok=True)
        try:
            rows = json.loads((dest / "teacher_task.json").read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError):
            shutil.rmtree(dest, ignore_errors=True)
            raise BadRequest("body: not a teacher task's outputs (no readable teacher_task.json in the archive)") from None
        return {"teacher_outputs": outputs_id, "rows": rows}

    return r
