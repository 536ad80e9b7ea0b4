"""A Python client for the FSDP training service's teacher-student routes.

    from providers.remote_fsdp.client import TrainingServiceClient
    svc = TrainingServiceClient("http://127.0.0.1:8322")
    teacher = svc.create_teacher_task("t1", teacher_model="/models/teacher", rows=prompts, top_k=20)
    svc.monitor_tasks([teacher], callback=print)
    students = svc.create_student_tasks("t1", [{"name": "a", "model": "/models/student",
                                                "method": "logit", "peft": {"type": "PEFT", "method": "lora"}}, ...])
    svc.monitor_tasks(students, callback=print)
    merged = svc.aggregate_student_outputs(students, output_name="merged", method="linear")

or the whole pipeline in one call: `svc.run_pipeline({...}, callback=print)`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import requests

from .workflow_client import ACTIVE, ServiceError, WorkflowClientMixin, follow_state


class TrainingServiceClient(WorkflowClientMixin):  # + chat, enhance_data, validate_model, export_model, run_workflow
    def __init__(self, base_url: str = "http://127.0.0.1:8322", api_token: str | None = None, timeout_s: float = 120):
        self.base_url = base_url.rstrip("/")
        self.http = requests.Session()
        if api_token:
            self.http.headers["authorization"] = f"Bearer {api_token}"
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, **kw) -> Any:
        r = self.http.request(method, self.base_url + path, timeout=self.timeout_s, **kw)
        if r.status_code >= 400:
            raise ServiceError(method, path, r.status_code, r.text)
        return r.json() if r.content else None

    def create_teacher_task(self, job_uuid: str, teacher_model: str, rows: list[dict] | None = None,
                            dataset_id: str | None = None, **teacher: Any) -> str:
        """Teacher answers (+ top-k log-probs with `top_k`) for every prompt; returns the task's job_uuid."""
        body = {"job_uuid": job_uuid, "teacher": {"model": teacher_model, **teacher}, "rows": rows,
                "dataset_id": dataset_id}
        return self._call("POST", "/v1/teacher-tasks", json=body)["job_uuid"]

    def create_student_tasks(self, teacher_task: str, students: list[dict]) -> list[str]:
        """Students trained from a completed teacher task's outputs; returns their job_uuids."""
        return self._call("POST", "/v1/student-tasks", json={"teacher_task": teacher_task, "students": students})["job_uuids"]

    def status(self, job_uuid: str) -> dict:
        return self._call("GET", "/v1/post-training/job/status", params={"job_uuid": job_uuid})

    def monitor_tasks(self, job_uuids: list[str], callback: Callable[[dict], None] | None = None,
                      interval_s: float = 1.0, timeout_s: float = 3600) -> dict[str, dict]:
        """Poll jobs until all have finished; `callback(status)` sees every change. Returns final statuses."""
        last: dict[str, tuple] = {}
        final: dict[str, dict] = {}
        deadline = time.monotonic() + timeout_s
        while len(final) < len(job_uuids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"tasks still running after {timeout_s}s: {sorted(set(job_uuids) - set(final))}")
            for job_uuid in job_uuids:
                if job_uuid in final:
                    continue
                s = self.status(job_uuid)
                key = (s["status"], s["resources_allocated"].get("step"))
                if callback and key != last.get(job_uuid):
                    callback(s)
                last[job_uuid] = key
                if s["status"] not in ACTIVE:
                    final[job_uuid] = s
            time.sleep(interval_s)
        return final

    def aggregate_student_outputs(self, job_uuids: list[str], output_name: str, method: str = "linear",
                                  weights: list[float] | None = None) -> dict:
        """Merge the students' adapters into one (they must share base model and PEFT type)."""
        body = {"job_uuids": job_uuids, "output_name": output_name, "method": method, "weights": weights}
        return self._call("POST", "/v1/adapters/merge", json=body)

    def run_pipeline(self, request: dict, callback: Callable[[dict], None] | None = None,
                     interval_s: float = 1.0, timeout_s: float = 3600) -> dict:
        """POST /v1/pipelines/teacher-student and follow it to the end; returns its final state."""
        pipeline_id = self._call("POST", "/v1/pipelines/teacher-student", json=request)["pipeline_id"]
        return follow_state(
            lambda: self._call("GET", f"/v1/pipelines/{pipeline_id}"),
            lambda s: (s["state"], s["teacher"].get("status"), s["teacher"].get("step"),
                       tuple((t.get("status"), t.get("step")) for t in s["students"])),
            f"pipeline {pipeline_id}", callback, interval_s, timeout_s)
