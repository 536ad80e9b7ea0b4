"""The dashboard's task routes over a data dir (no browser, no training): the lists and reports of
enhancement, validation, export and workflow tasks as DATA_DIR/workflows/KIND/ID/ holds them, and names
that are not a task refused with a 404."""

from __future__ import annotations

import json

from fastapi import FastAPI
from fastapi.testclient import TestClient

from providers.dashboard import dashboard_router, data_dir_source
from providers.jobs.store import JobStore


def write_task(root, kind, task_id, state, report_name=None, report=None, **extra):
    d = root / "workflows" / kind / task_id
    d.mkdir(parents=True)
    (d / "task.json").write_text(json.dumps({"id": task_id, "kind": kind, "state": state, "created_at": "2026-01-01",
                                             "started_at": None, "finished_at": None, "error": None, "progress": {},
                                             "outputs": {}, "request": {"model": "job:x"}, **extra}))
    if report_name:
        (d / report_name).parent.mkdir(parents=True, exist_ok=True)
        (d / report_name).write_text(json.dumps(report))
    return d


def test_task_lists_and_reports(tmp_path):
    JobStore(tmp_path / "jobs.db")
    write_task(tmp_path, "validations", "v1", "completed", "validation.json",
               {"passed": False, "summary": {"pass_rate": 0.25}, "verdict": {"reason": "below the bar"}})
    write_task(tmp_path, "enhancements", "e1", "completed", "enhancement_report.json",
               {"rows_total": 8, "rows_kept": 6, "solved": {"student_alone": 2, "student_after_hint": 3,
                                                            "teacher_only": 1, "unsolved": 2}})
    write_task(tmp_path, "exports", "x1", "failed", error="RuntimeError: no space")
    w = write_task(tmp_path, "workflows", "w1", "completed", "pipeline_results.json",
                   {"steps": {"enhance": {"status": "completed"}, "train": {"status": "completed"}}})
    (w / "validate").mkdir()
    (w / "validate" / "validation.json").write_text(json.dumps({"passed": True}))
    app = FastAPI()
    app.include_router(dashboard_router(data_dir_source(tmp_path), actions=False), prefix="/dashboard")
    http = TestClient(app)

    kinds = ("validations", "enhancements", "exports", "workflows")
    rows = {k: http.get(f"/dashboard/api/tasks/{k}").json()["data"] for k in kinds}
    assert rows["validations"][0]["headline"] == "FAILED, pass rate 25%"
    assert rows["enhancements"][0]["headline"] == "6 of 8 rows kept; student 2 alone, 3 after hints, teacher 1"
    assert rows["exports"][0]["state"] == "failed" and rows["exports"][0]["error"] == "RuntimeError: no space"
    assert rows["workflows"][0]["headline"] == "enhance completed → train completed"
    v = http.get("/dashboard/api/tasks/validations/v1").json()
    assert v["report"]["verdict"]["reason"] == "below the bar" and v["state"] == "completed"
    wf = http.get("/dashboard/api/tasks/workflows/w1").json()
    assert wf["step_reports"] == {"enhance": None, "validate": {"passed": True}, "export": None}
    assert http.get("/dashboard/api/tasks/exports/x1").json()["report"] is None
    for path, field in [("/dashboard/api/tasks/jobs", "kind"), ("/dashboard/api/tasks/validations/nope", "task_id"),
                        ("/dashboard/api/tasks/validations/v1%0A", "task_id"),
                        ("/dashboard/api/tasks/runs/v1", "task_id")]:
        r = http.get(path)
        assert r.status_code == 404 and r.json()["detail"].startswith(field), (path, r.text)
