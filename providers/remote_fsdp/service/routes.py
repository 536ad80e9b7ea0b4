"""HTTP routes of the FSDP training service.

The 0.2.12 post-training API under /v1/post-training (query-string job routes), and the shapes of later
Llama Stack releases under /v1alpha/post-training (also `jobs/{job_uuid}/status|cancel|artifacts`).
Plus dataset uploads, job logs, and /health. Handlers are plain functions: FastAPI runs them in its
thread pool, so a long submission never blocks status polls.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, StreamingResponse
from starlette.background import BackgroundTask

from ...errors import BadRequest
from ...jobs.store import ACTIVE
from ...api.requests import JobRef, PreferenceOptimizeRequest, SupervisedFineTuneRequest
from ...training.plots import plot_files
from .config import ServiceConfig
from .jobs import FsdpJobService
from .nodes import Heartbeat, HeartbeatAnswer, Node, NodeRegistry, Registration
from .security import (
    DiskQuota,
    check_node_url,
    host_is,
    temp_path,
    write_archive,
)

# Log streams: how many may be open at once, and how long one may follow a job.
MAX_LOG_FOLLOWERS = 32
MAX_FOLLOW_S = 6 * 3600
_followers = 0


def post_training_router(service: FsdpJobService) -> APIRouter:
    """Every job route goes through the service, which asks the job's launcher (providers/launchers)."""
    r = APIRouter()

    @r.post("/supervised-fine-tune")
    def supervised_fine_tune(req: SupervisedFineTuneRequest) -> dict[str, str]:
        return service.submit_job("supervised-fine-tune", req)

    @r.post("/preference-optimize")
    def preference_optimize(req: PreferenceOptimizeRequest) -> dict[str, str]:
        return service.submit_job("preference-optimize", req)

    # Reads below are sub-millisecond local reads: async, so a poll needs no thread-pool hop (under
    # training load each hop waits for a core twice, which is what stretches the p99 of status polls).
    @r.get("/jobs")
    async def list_jobs() -> dict[str, list[dict[str, str]]]:
        return {"data": service.list_jobs()}

    @r.get("/job/status", response_model=None)
    async def job_status(job_uuid: str = Query(...)) -> dict[str, Any]:
        return service.job_view(job_uuid)

    @r.post("/job/cancel", response_model=None)
    def job_cancel(ref: JobRef) -> dict[str, Any]:
        """Cancel, then the job's status as /job/status gives it (Llama Stack's own cancel route, served by
        the remote::trl_fsdp adapter, still answers null as its protocol says)."""
        service.cancel_job(ref.job_uuid)
        return service.job_view(ref.job_uuid)

    @r.post("/job/resume")
    def job_resume(ref: JobRef) -> dict[str, str]:
        """Run a failed or cancelled job again from its newest checkpoint (exact resume), on every node it
        spans, or through its scheduler."""
        return {"job_uuid": ref.job_uuid, "status": service.resume_job(ref.job_uuid).status}

    @r.get("/job/artifacts", response_model=None)
    async def job_artifacts(job_uuid: str = Query(...)) -> dict[str, Any]:
        view = service.view(job_uuid)
        return {"job_uuid": job_uuid, "checkpoints": view["checkpoints"],
                "plots": plot_files(view["resources_allocated"]["run_dir"])}  # RUN_DIR/plots/*.png

    @r.get("/job/download")
    def job_download(job_uuid: str = Query(...)) -> FileResponse:
        """The job's newest checkpoint (a teacher task's outputs) as a tar.gz, built on disk and streamed."""
        view = service.view(job_uuid)
        if view["status"] != "completed" or not view["checkpoints"]:
            raise BadRequest(f"job_uuid: {job_uuid!r} is {view['status']} and has no final checkpoint yet")
        archive = temp_path(service.data_dir / "tmp", job_uuid)
        try:
            write_archive(Path(view["checkpoints"][-1]["path"]), archive)
        except BaseException:
            archive.unlink(missing_ok=True)
            raise
        return FileResponse(archive, media_type="application/gzip", filename=f"{job_uuid}.tar.gz",
                            background=BackgroundTask(archive.unlink, missing_ok=True))

    @r.get("/job/logs")
    async def job_logs(job_uuid: str = Query(...), tail: int = Query(100, ge=0, le=100000),
                       follow: bool = False, rank: int | None = Query(None, ge=0, le=100000)):
        """The job's log (rank 0's under torchrun, or `rank`'s); `follow` streams new lines until it ends."""
        global _followers
        job = service.jobs.store.get(job_uuid)
        logs = Path(job.run_dir) / "logs"
        path = logs / (f"rank{rank}.log" if rank is not None else "rank0.log")
        if not path.exists():
            path = logs / "train.log"
        lines = await asyncio.to_thread(tail_lines, path, tail)
        if not follow:
            return {"job_uuid": job_uuid, "log_file": str(path), "log_lines": lines}
        if _followers >= MAX_LOG_FOLLOWERS:
            raise HTTPException(status_code=429, detail=f"follow: {MAX_LOG_FOLLOWERS} log streams are open already")
        return StreamingResponse(_follow(service, job_uuid, path, lines), media_type="text/plain")

    # Later Llama Stack releases: jobs/{job_uuid}/status|cancel|artifacts
    @r.get("/jobs/{job_uuid}/status", response_model=None)
    async def job_status_by_path(job_uuid: str) -> dict[str, Any]:
        return await job_status(job_uuid)

    @r.get("/jobs/{job_uuid}/artifacts", response_model=None)
    async def job_artifacts_by_path(job_uuid: str) -> dict[str, Any]:
        return await job_artifacts(job_uuid)

    @r.post("/jobs/{job_uuid}/cancel", response_model=None)
    def job_cancel_by_path(job_uuid: str) -> dict[str, Any]:
        return job_cancel(JobRef(job_uuid=job_uuid))

    return r


def tail_lines(path: Path, n: int) -> list[str]:
    """The last `n` lines of a file, reading only its end (logs grow to gigabytes)."""
    if n == 0 or not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        block, data = 1 << 16, b""
        while end > 0 and data.count(b"\n") <= n:
            start = max(0, end - block)
            f.seek(start)
            data = f.read(end - start) + data
            end = start
            block *= 2
    return data.decode(errors="replace").splitlines()[-n:]


async def _follow(service: FsdpJobService, job_uuid: str, path: Path, lines: list[str]):
    """New log text until the job ends (or MAX_FOLLOW_S passes); file reads happen off the event loop."""
    global _followers
    _followers += 1
    try:
        for line in lines:
            yield line + "\n"
        pos = path.stat().st_size if path.exists() else 0
        deadline = time.monotonic() + MAX_FOLLOW_S
        while time.monotonic() < deadline:
            size = path.stat().st_size if path.exists() else 0
            if size > pos:
                chunk, pos = await asyncio.to_thread(_read_from, path, pos)
                yield chunk
            elif service.jobs.store.get(job_uuid).status not in ACTIVE:
                return
            await asyncio.sleep(0.5)
    finally:
        _followers -= 1


def _read_from(path: Path, pos: int, limit: int = 1 << 20) -> tuple[str, int]:
    with open(path, "rb") as f:
        f.seek(pos)
        data = f.read(limit)
    return data.decode(errors="replace"), pos + len(data)


def job_parts_router(service: FsdpJobService, config: ServiceConfig) -> APIRouter:
    """Where a coordinator sends this node its part of a multi-node job (node token required): the only
    way rendezvous placement (node rank, master address and port) gets into a job."""
    r = APIRouter()

    def submit_part(route: str, body: dict[str, Any]) -> dict[str, str]:
        tc = body.get("training_config")
        torch_run = tc.get("torch_run_config") if isinstance(tc, dict) else None
        master = torch_run.get("master_addr") if isinstance(torch_run, dict) else None
        coordinator = config.coordinator
        if not coordinator:
            raise BadRequest("part_of: this node has no coordinator, so it takes no job parts")
        from urllib.parse import urlsplit

        if not isinstance(master, str) or not host_is(urlsplit(coordinator).hostname or "", master):
            raise BadRequest(f"training_config.torch_run_config.master_addr: {str(master)[:100]!r} is not this "
                             f"node's coordinator ({coordinator})")
        return service.submit_request(route, body, trusted=True)

    @r.post("/parts/supervised-fine-tune")
    def supervised_fine_tune_part(req: SupervisedFineTuneRequest) -> dict[str, str]:
        return submit_part("supervised-fine-tune", req.model_dump(mode="json"))

    @r.post("/parts/preference-optimize")
    def preference_optimize_part(req: PreferenceOptimizeRequest) -> dict[str, str]:
        return submit_part("preference-optimize", req.model_dump(mode="json"))

    return r


def datasets_router(service: FsdpJobService) -> APIRouter:
    r = APIRouter()

    @r.post("/datasets/{dataset_id}/rows")
    async def upload_rows(dataset_id: str, request: Request, append: bool = False) -> dict[str, Any]:
        """Store rows as the service dataset `dataset_id`: a JSONL body (streamed to disk, up to the upload
        limit) or, with content-type application/json, a JSON list (up to the body limit). `append=true`
        adds to an existing dataset, so large datasets can also be sent in chunks."""
        path = service.dataset_path(dataset_id)
        tmp = temp_path(path.parent, path.name)
        # Every byte is claimed from the data dir's quota before it is written (507 past it).
        with DiskQuota.of(service.config).reservation(f"dataset {dataset_id}") as quota:
            try:
                if request.headers.get("content-type", "").startswith("application/json"):
                    body = await request.body()
                    if len(body) > service.config.max_body_mb << 20:
                        raise HTTPException(status_code=413, detail="body: a JSON list is limited to "
                                            f"{service.config.max_body_mb} MB; send JSONL (streamed) instead")
                    try:
                        data = json.loads(body)
                    except (ValueError, RecursionError) as e:
                        raise BadRequest(f"body: not JSON ({str(e)[:200]})") from None
                    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
                        raise BadRequest("body: a JSON body must be a list of row objects")
                    text = "".join(json.dumps(row) + "\n" for row in data)
                    quota.add(len(text.encode()))
                    await asyncio.to_thread(tmp.write_text, text)
                else:
                    quota.expect(declared_length(request) + 1)
                    last = b"\n"
                    with open(tmp, "wb") as f:
                        async for chunk in request.stream():
                            quota.add(len(chunk))
                            f.write(chunk)
                            last = chunk[-1:] or last
                        if last != b"\n":  # keep appended chunks on separate lines
                            quota.add(1)
                            f.write(b"\n")
                rows = await asyncio.to_thread(count_jsonl_rows, tmp)
                if append and path.exists():
                    await asyncio.to_thread(_append_file, tmp, path)
                else:
                    tmp.replace(path)
            finally:
                tmp.unlink(missing_ok=True)
        return {"dataset_id": dataset_id, "rows": rows, "appended": append}

    @r.get("/datasets")
    def list_datasets() -> dict[str, Any]:
        return {"data": service.list_datasets()}

    return r


def declared_length(request: Request) -> int:
    """The body's Content-Length, or 0 when it is not given (chunked) or not a number."""
    try:
        return max(0, int(request.headers.get("content-length", "0")))
    except ValueError:
        return 0


def _append_file(src: Path, dest: Path) -> None:
    with open(dest, "ab") as out, open(src, "rb") as f:
        shutil.copyfileobj(f, out)


def count_jsonl_rows(path: Path) -> int:
    """Rows in a JSONL file; raises ValueError naming the first line that is not a JSON object."""
    rows = 0
    with open(path, encoding="utf-8", errors="strict") as f:
        for n, line in enumerate(_lines(f), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise BadRequest(f"body: line {n} is not JSON ({str(e)[:200]})") from None
            if not isinstance(row, dict):
                raise BadRequest(f"body: line {n} is a {type(row).__name__}, not a row object")
            rows += 1
    if rows == 0:
        raise BadRequest("body: no rows")
    return rows


def _lines(f):
    try:
        yield from f
    except UnicodeDecodeError as e:
        raise BadRequest(f"body: not UTF-8 text ({e})") from None


def nodes_router(registry: NodeRegistry) -> APIRouter:
    """The registry as clients see it (client token)."""
    r = APIRouter()

    @r.get("/nodes")
    def list_nodes() -> dict[str, list[Node]]:
        return {"data": registry.nodes()}

    return r


def node_membership_router(registry: NodeRegistry, ended_parts) -> APIRouter:
    """Joining the cluster (node token): registration and heartbeats. `ended_parts(node_id, url, job_uuids)`:
    which of the parts a node says it runs were placed on it and belong to jobs that ended here (the heartbeat's
    answer names them)."""
    r = APIRouter()

    @r.post("/nodes/register")
    def register(reg: Registration, request: Request) -> Node:
        peer = request.client.host if request.client else None
        reg.url = check_node_url(reg.url, peer)
        return registry.register(reg, peer)

    @r.post("/nodes/{node_id}/heartbeat")
    def heartbeat(node_id: str, beat: Heartbeat, request: Request) -> HeartbeatAnswer:
        try:
            node = registry.heartbeat(node_id, beat, request.client.host if request.client else None)
        except KeyError:
            raise HTTPException(status_code=404, detail=f"node_id: {node_id[:200]!r} is not registered") from None
        # Only this node's own parts (placed on it at its URL: not those of a machine it took the name over from).
        ended = ended_parts(node_id, node.url, beat.parts) if beat.parts else {}
        return HeartbeatAnswer(**node.model_dump(), ended_parts=ended)

    return r
