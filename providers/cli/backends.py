"""The two servers the CLI talks to, behind one interface: the FSDP training service (plain HTTP) and a
Llama Stack server (through llama-stack-client). `connect(url)` tells them apart by their health route:
the service answers GET /health with its node_id, Llama Stack answers GET /v1/health."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from .errors import EXIT_USAGE, CliError, body_detail, http_error

ACTIVE = ("scheduled", "in_progress")


def _http_error(r: httpx.Response, where: str) -> CliError:
    return http_error(r.status_code, body_detail(r.text), where)


class ServiceBackend:
    """The FSDP training service: every command."""

    kind = "fsdp-service"

    def __init__(self, url: str, token: str | None = None, timeout: float = 120.0):
        self.url = url.rstrip("/")
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kw) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise CliError(f"{self.url}{path}: {type(e).__name__}: {e}") from None
        if r.status_code >= 400:
            raise _http_error(r, f"{method} {path}")
        return r.json() if r.content and r.headers.get("content-type", "").startswith("application/json") else None

    # Tinker API sessions
    def tinker_sessions(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/v1/session_overview")["sessions"]

    def end_tinker_session(self, session_id: str) -> None:
        self._call("POST", f"/api/v1/sessions/{session_id}/finish")

    # datasets and jobs
    def has_dataset(self, dataset_id: str) -> bool:
        return any(d["dataset_id"] == dataset_id for d in self._call("GET", "/v1/datasets")["data"])

    def upload(self, dataset_id: str, rows: list[dict[str, Any]]) -> None:
        body = "".join(json.dumps(r) + "\n" for r in rows)
        self._call("POST", f"/v1/datasets/{dataset_id}/rows", content=body.encode(),
                   headers={"content-type": "application/x-ndjson"})

    def submit(self, route: str, body: dict[str, Any]) -> str:
        return self._call("POST", f"/v1/post-training/{route}", json=body)["job_uuid"]

    def jobs(self) -> list[dict[str, Any]]:
        try:
            return self._call("GET", "/dashboard/api/jobs")["data"]
        except CliError:  # dashboard switched off: the plain API, one status per job
            return [summary(self.status(j["job_uuid"])) for j in self._call("GET", "/v1/post-training/jobs")["data"]]

    def status(self, job_uuid: str) -> dict[str, Any]:
        return self._call("GET", "/v1/post-training/job/status", params={"job_uuid": job_uuid})

    def artifacts(self, job_uuid: str) -> dict[str, Any]:
        return self._call("GET", "/v1/post-training/job/artifacts", params={"job_uuid": job_uuid})

    def cancel(self, job_uuid: str) -> None:
        self._call("POST", "/v1/post-training/job/cancel", json={"job_uuid": job_uuid})

    def resume(self, job_uuid: str) -> str:
        return self._call("POST", "/v1/post-training/job/resume", json={"job_uuid": job_uuid})["status"]

    def metrics(self, job_uuid: str, since: int) -> tuple[list[dict[str, Any]], int]:
        try:
            m = self._call("GET", f"/dashboard/api/jobs/{job_uuid}/metrics", params={"since": since})
            return m["records"], m["next"]
        except CliError:
            return [], since

    def logs(self, job_uuid: str, tail: int, rank: int | None) -> list[str]:
        params = {"job_uuid": job_uuid, "tail": tail, **({"rank": rank} if rank is not None else {})}
        return self._call("GET", "/v1/post-training/job/logs", params=params)["log_lines"]

    def follow_logs(self, job_uuid: str, tail: int, rank: int | None) -> Iterator[str]:
        params = {"job_uuid": job_uuid, "tail": tail, "follow": "true", **({"rank": rank} if rank is not None else {})}
        with self.http.stream("GET", "/v1/post-training/job/logs", params=params, timeout=None) as r:
            if r.status_code >= 400:
                r.read()
                raise _http_error(r, "GET /v1/post-training/job/logs")
            yield from r.iter_text()

    # nodes and pipelines
    def nodes(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/nodes")["data"]

    def submit_pipeline(self, body: dict[str, Any]) -> str:
        return self._call("POST", "/v1/pipelines/teacher-student", json=body)["pipeline_id"]

    def pipeline(self, pipeline_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/pipelines/{pipeline_id}")


class StackBackend:
    """A Llama Stack server (inline::trl or remote::trl_fsdp behind it), through llama-stack-client.

    The post-training API has no logs, metrics or resume: those are read from the job's run directory
    (its path is in the status) when this machine can see it."""

    kind = "llama-stack"

    def __init__(self, url: str, token: str | None = None):
        from llama_stack_client import LlamaStackClient

        self.url = url.rstrip("/")
        self.client = LlamaStackClient(base_url=self.url, api_key=token, max_retries=0, timeout=120)

    def _wrap(self, fn, *a, **kw):
        from llama_stack_client import APIConnectionError, APIStatusError

        try:
            return fn(*a, **kw)
        except APIStatusError as e:
            raise http_error(e.response.status_code, body_detail(e.response.text),
                             f"{e.response.request.method} {e.response.request.url.path}") from None
        except APIConnectionError as e:
            raise CliError(f"{self.url}: {e}") from None

    def has_dataset(self, dataset_id: str) -> bool:
        try:
            return any(d.identifier == dataset_id for d in self._wrap(self.client.datasets.list))
        except CliError:
            return False

    def upload(self, dataset_id: str, rows: list[dict[str, Any]]) -> None:
        self._wrap(self.client.datasets.register, purpose="post-training/messages", dataset_id=dataset_id,
                   source={"type": "rows", "rows": rows})

    def submit(self, route: str, body: dict[str, Any]) -> str:
        fn = self.client.post_training.preference_optimize if route == "preference-optimize" \
            else self.client.post_training.supervised_fine_tune
        known = {"job_uuid", "training_config", "hyperparam_search_config", "logger_config", "algorithm_config",
                 "checkpoint_dir", "model", "finetuned_model"}
        extra = {k: v for k, v in body.items() if k not in known}
        return self._wrap(fn, **{k: v for k, v in body.items() if k in known}, extra_body=extra or None).job_uuid

    def jobs(self) -> list[dict[str, Any]]:
        return [summary(self.status(j.job_uuid)) for j in self._wrap(self.client.post_training.job.list)]

    def status(self, job_uuid: str) -> dict[str, Any]:
        return self._wrap(self.client.post_training.job.status, job_uuid=job_uuid).to_dict()

    def artifacts(self, job_uuid: str) -> dict[str, Any]:
        out = self._wrap(self.client.post_training.job.artifacts, job_uuid=job_uuid).to_dict()
        run_dir = self._run_dir(job_uuid)
        if run_dir is not None:
            from ..training.plots import plot_files

            out["plots"] = plot_files(run_dir)
        return out

    def cancel(self, job_uuid: str) -> None:
        self._wrap(self.client.post_training.job.cancel, job_uuid=job_uuid)

    def resume(self, job_uuid: str) -> str:
        raise CliError("resume: the Llama Stack post-training API has no resume; submit the same job file again "
                       "with a new job_uuid and the old checkpoint_dir, or use the FSDP service directly", EXIT_USAGE)

    def _run_dir(self, job_uuid: str) -> Path | None:
        run_dir = (self.status(job_uuid).get("resources_allocated") or {}).get("run_dir")
        return Path(run_dir) if run_dir and Path(run_dir).is_dir() else None

    def metrics(self, job_uuid: str, since: int) -> tuple[list[dict[str, Any]], int]:
        run_dir = self._run_dir(job_uuid)
        if run_dir is None:
            return [], since
        from ..dashboard.sources import read_metrics

        return read_metrics(run_dir, since)

    def _log_file(self, job_uuid: str, rank: int | None) -> Path:
        run_dir = self._run_dir(job_uuid)
        if run_dir is None:
            raise CliError(f"logs: job {job_uuid!r} runs on another machine (its run dir is not visible here); "
                           "the Llama Stack API serves no logs", EXIT_USAGE)
        from ..dashboard.sources import log_path

        return log_path(run_dir, rank)

    def logs(self, job_uuid: str, tail: int, rank: int | None) -> list[str]:
        from ..dashboard.sources import tail_lines

        return tail_lines(self._log_file(job_uuid, rank), tail)

    def follow_logs(self, job_uuid: str, tail: int, rank: int | None) -> Iterator[str]:
        path = self._log_file(job_uuid, rank)
        for line in self.logs(job_uuid, tail, rank):
            yield line + "\n"
        pos = path.stat().st_size if path.exists() else 0
        while True:
            if path.exists() and path.stat().st_size > pos:
                with open(path, errors="replace") as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos = f.tell()
                yield chunk
            elif self.status(job_uuid)["status"] not in ACTIVE:
                return
            time.sleep(0.5)

    def nodes(self) -> list[dict[str, Any]]:
        raise CliError("nodes: a Llama Stack server has no node registry; point --url at the FSDP service", EXIT_USAGE)

    def submit_pipeline(self, body: dict[str, Any]) -> str:
        raise CliError("pipeline: teacher-student pipelines run on the FSDP service; point --url at it", EXIT_USAGE)

    def pipeline(self, pipeline_id: str) -> dict[str, Any]:
        return self.submit_pipeline({})  # raises


def summary(status: dict[str, Any]) -> dict[str, Any]:
    """A status answer reduced to a jobs-table row (the dashboard's /api/jobs shape)."""
    res = status.get("resources_allocated") or {}
    step, total = res.get("step"), res.get("total_steps")
    return {"job_uuid": status["job_uuid"], "status": status["status"], "method": res.get("method"),
            "model": res.get("model"), "step": step, "total_steps": total, "world_size": res.get("world_size"),
            "nodes": [n.get("node_id") for n in res.get("nodes") or []], "last_loss": res.get("last_loss"),
            "final_loss": res.get("final_train_loss"), "started_at": status.get("started_at"),
            "completed_at": status.get("completed_at"), "duration_s": None, "error": res.get("error")}


def connect(url: str, token: str | None = None) -> ServiceBackend | StackBackend:
    """The backend at `url`, told apart by its health route."""
    url = url.rstrip("/")
    headers = {"authorization": f"Bearer {token}"} if token else {}
    errors = []
    for path in ("/health", "/v1/health"):
        try:
            r = httpx.get(url + path, headers=headers, timeout=10)
        except httpx.HTTPError as e:
            errors.append(f"{path}: {type(e).__name__}: {e}")
            continue
        if r.status_code == 200:
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            if path == "/health" and "node_id" in body:
                return ServiceBackend(url, token)
            if path == "/v1/health":
                return StackBackend(url, token)
        errors.append(f"{path}: HTTP {r.status_code}")
    raise CliError(f"no post-training server at {url} (neither the FSDP service's /health nor Llama Stack's "
                   f"/v1/health answered: {'; '.join(errors)}); set --url or TRL_POST_TRAINING_URL")
