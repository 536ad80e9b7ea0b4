"""What the dashboard shows, read from where jobs live: the job store and each job's run directory.

One `JobsSource` serves both the FSDP service (its own store, node registry and cancel/resume) and
`trl-post-training dashboard --data-dir DIR` (an inline provider's or a service's data dir, read-only
unless actions are given). Every read is a local file or SQLite read: no HTTP, no training imports.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import access
from ..jobs.store import ACTIVE, JobStore, UnknownJobError
from ..training.methods import headline_metrics
from ..training.plots import plot_files
from ..training.run_files import RunFiles
from ..training.spec import SAFE_NAME

# Workflow tasks (DATA_DIR/workflows/KIND/ID/task.json, written by providers/workflows/tasks.py) and the
# report each kind writes beside its state.
TASK_REPORTS = {"enhancements": "enhancement_report.json", "validations": "validation.json",
                "exports": "export.json", "workflows": "pipeline_results.json"}
# A workflow's step reports, under its own directory.
WORKFLOW_STEP_REPORTS = {"enhance": "enhance/enhancement_report.json", "validate": "validate/validation.json",
                         "export": "export/export.json"}


def _seconds(start: str | None, end: str | None) -> float | None:
    if not start:
        return None
    t0 = datetime.fromisoformat(start)
    t1 = datetime.fromisoformat(end) if end else datetime.now(t0.tzinfo)
    return max(0.0, (t1 - t0).total_seconds())


def read_metrics(run_dir: str | Path, since: int = 0) -> tuple[list[dict[str, Any]], int]:
    """metrics.jsonl records from byte offset `since`, and the offset to ask from next time.

    Only whole lines are returned, so a record being written is picked up on the next call."""
    path = RunFiles(run_dir).metrics
    try:
        with open(path, "rb") as f:
            f.seek(since)
            data = f.read()
    except FileNotFoundError:
        return [], 0
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records, since + end


def last_metrics(run_dir: str | Path, n: int = 20, max_bytes: int = 16384) -> list[dict[str, Any]]:
    """The last `n` metrics records, read from the end of the file (cheap for long runs)."""
    path = RunFiles(run_dir).metrics
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.splitlines()[1:] if size > max_bytes else data.splitlines()
    records = []
    for line in lines[-n:]:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def rates(records: list[dict[str, Any]]) -> dict[str, float]:
    """Steps/s and tokens/s over the given (recent) training records."""
    train = [r for r in records if "loss" in r and "time" in r and "step" in r]
    out: dict[str, float] = {}
    if len(train) >= 2 and train[-1]["time"] > train[0]["time"]:
        out["steps_per_s"] = (train[-1]["step"] - train[0]["step"]) / (train[-1]["time"] - train[0]["time"])
    tok = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
    if tok:
        out["tokens_per_s"] = tok[-1]
    return out


def log_path(run_dir: str | Path, rank: int | None = None) -> Path:
    """Rank N's log under torchrun (rank 0's by default), else the job's main log."""
    files = RunFiles(run_dir)
    path = files.logs / f"rank{0 if rank is None else rank}.log"
    return path if path.exists() else files.log


def tail_lines(path: Path, n: int = 200, max_bytes: int = 262144) -> list[str]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - max_bytes))
            data = f.read().decode(errors="replace")
    except FileNotFoundError:
        return []
    lines = data.splitlines()
    return (lines[1:] if size > max_bytes else lines)[-n:]


@dataclass
class JobsSource:
    """Jobs (and optionally nodes, pipelines and actions) for the dashboard.

    `view(job_uuid)` returns a job's status view (the API's status shape); `nodes()` a list of node
    dicts; `pipeline_view(pid)` a pipeline with each task's live status; `cancel`/`resume` act on a job.
    Without actions the dashboard is read-only."""

    store: JobStore
    data_dir: Path
    view: Callable[[str], dict[str, Any]]
    nodes: Callable[[], list[dict[str, Any]]] = lambda: []
    pipeline_view: Callable[[str], dict[str, Any]] | None = None
    cancel: Callable[[str], Any] | None = None
    resume: Callable[[str], Any] | None = None
    cancel_pipeline: Callable[[str], Any] | None = None
    kind: str = "service"
    names: list[Callable[[str], str | None]] = field(default_factory=list)  # a job's name (an OpenAI job's ft: id)
    marks: list[Callable[[str], list[dict]]] = field(default_factory=list)  # its pauses and resumes (OpenAI jobs)
    _summary_cache: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def actions(self) -> bool:
        return self.cancel is not None

    def jobs(self) -> list[dict[str, Any]]:
        out = []
        for job in reversed(self.store.list()):
            cached = self._summary_cache.get(job.job_uuid)
            # A finished job's files no longer change: its row is cached while the store says the same state.
            out.append(cached if cached and cached["status"] == job.status else self.summary(job.job_uuid))
        return out

    def summary(self, job_uuid: str) -> dict[str, Any]:
        """One row of the jobs table."""
        v = self.view(job_uuid)
        res = v.get("resources_allocated") or {}
        step, total = res.get("step"), res.get("total_steps")
        nodes = res.get("nodes")
        node_ids = [n.get("node_id") for n in nodes] if isinstance(nodes, list) else []
        row = {
            "job_uuid": job_uuid,
            "name": next((n for n in (name(job_uuid) for name in self.names) if n), None),
            "owner": res.get("owner"),
            "status": v["status"],
            "method": res.get("method"),
            "model": res.get("model"),
            "step": step,
            "total_steps": total,
            "progress": (step / total) if step is not None and total else (1.0 if v["status"] == "completed" else 0.0),
            "world_size": res.get("world_size"),
            "nodes": node_ids,
            "scheduled_at": v.get("scheduled_at"),
            "started_at": v.get("started_at"),
            "completed_at": v.get("completed_at"),
            "duration_s": _seconds(v.get("started_at"), v.get("completed_at")),
            "last_loss": res.get("last_loss"),
            "last": self._last_headline(res),
            "final_loss": res.get("final_train_loss"),
            "final_validation_loss": res.get("final_validation_loss"),
            "error": res.get("error"),
        }
        if v["status"] not in ACTIVE:
            self._summary_cache[job_uuid] = row
        return row

    @staticmethod
    def _last_headline(res: dict[str, Any]) -> dict[str, float]:
        """The method's headline metrics (methods.py) at its last logged training step: what the list shows."""
        run_dir = res.get("run_dir")
        steps = [r for r in RunFiles(run_dir).last_metrics() if "loss" in r] if run_dir else []
        return headline_metrics(res.get("method"), steps[-1]) if steps else {}

    def job(self, job_uuid: str) -> dict[str, Any]:
        v = self.view(job_uuid)
        run_dir = (v.get("resources_allocated") or {}).get("run_dir") or str(self.data_dir / "runs" / job_uuid)
        spec_path = Path(run_dir) / "spec.json"
        try:
            spec = json.loads(spec_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            spec = None
        ranks = sorted(int(p.stem[4:]) for p in (Path(run_dir) / "logs").glob("rank*.log") if p.stem[4:].isdigit())
        return {**v, "summary": self.summary(job_uuid), "spec": spec, "log_ranks": ranks,
                "marks": [m for marks in self.marks for m in marks(job_uuid)],
                "plots": [Path(p).name for p in plot_files(run_dir)]}

    def job_page(self, job_uuid: str) -> dict[str, Any]:
        """job() plus the recent rates and, for a running job with a rate, the ETA of its last step."""
        out = self.job(job_uuid)
        run_dir = (out.get("resources_allocated") or {}).get("run_dir") or str(self.data_dir / "runs" / job_uuid)
        rate = rates(last_metrics(run_dir))
        s = out["summary"]
        eta = None
        if s["status"] in ACTIVE and rate.get("steps_per_s") and s["step"] is not None and s["total_steps"]:
            eta = max(0.0, (s["total_steps"] - s["step"]) / rate["steps_per_s"])
        return {**out, "rates": rate, "eta_s": eta}

    def run_dir(self, job_uuid: str) -> Path:
        return Path(self.store.get(job_uuid).run_dir)

    def _task_dir(self, kind: str, task_id: str) -> Path:
        if kind not in TASK_REPORTS or not re.fullmatch(SAFE_NAME, task_id):
            raise UnknownJobError(task_id)
        return self.data_dir / "workflows" / kind / task_id

    def tasks(self, kind: str) -> list[dict[str, Any]]:
        """The tasks of one kind (enhancements, validations, exports, workflows), newest first, each with a
        one-line headline of its report."""
        if kind not in TASK_REPORTS:
            raise UnknownJobError(kind)
        out = []
        for path in (self.data_dir / "workflows" / kind).glob("*/task.json"):
            state = _read_json(path)
            if not isinstance(state, dict) or "state" not in state or not access.can_see(state.get("owner")):
                continue
            report = _read_json(path.parent / TASK_REPORTS[kind])
            out.append({"id": path.parent.name, "kind": kind, "state": state["state"],
                        "created_at": state.get("created_at"), "started_at": state.get("started_at"),
                        "finished_at": state.get("finished_at"), "error": state.get("error"),
                        "owner": state.get("owner"), "headline": task_headline(kind, report if isinstance(report, dict) else None, state)})
        return sorted(out, key=lambda t: t["created_at"] or "", reverse=True)

    def task(self, kind: str, task_id: str) -> dict[str, Any]:
        """A task's state (its request without the rows), its report, and a workflow's step reports."""
        d = self._task_dir(kind, task_id)
        state = _read_json(d / "task.json")
        if not isinstance(state, dict) or not access.can_see(state.get("owner")):
            raise UnknownJobError(task_id)
        report = _read_json(d / TASK_REPORTS[kind])
        out = {**state, "report": report}
        if kind == "workflows":
            out["step_reports"] = {step: _read_json(d / rel) for step, rel in WORKFLOW_STEP_REPORTS.items()}
        return out

    def pipelines(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted((self.data_dir / "pipelines").glob("*/pipeline.json")):
            try:
                state = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue
            if not access.can_see(state.get("owner")):
                continue
            out.append({"pipeline_id": state["pipeline_id"], "state": state["state"], "owner": state.get("owner"),
                        "created_at": state.get("created_at"), "finished_at": state.get("finished_at"),
                        "students": len(state.get("students", [])), "error": state.get("error")})
        return out

    def pipeline(self, pipeline_id: str) -> dict[str, Any]:
        if self.pipeline_view is not None:
            return self.pipeline_view(pipeline_id)
        state = read_pipeline(self.data_dir, pipeline_id)
        for task in [state["teacher"], *state["students"]]:
            try:
                task.update({k: v for k, v in self.summary(task["job_uuid"]).items() if k != "job_uuid"})
            except UnknownJobError:
                task.setdefault("status", "scheduled")
        return state


def _read_json(path: Path) -> Any:
    """The file's JSON, or None when it is missing or being written."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def task_headline(kind: str, report: dict[str, Any] | None, state: dict[str, Any]) -> str:
    """What a task came to, in a few words, for the task lists."""
    if report is None:
        progress = (state.get("progress") or {}).get("enhance") or {}
        return f"{progress.get('done', 0)} / {progress.get('total', '?')} rows" if progress else ""
    if kind == "validations":
        rate = (report.get("summary") or {}).get("pass_rate")
        return (f"{'PASSED' if report.get('passed') else 'FAILED'}"
                + (f", pass rate {rate:.0%}" if isinstance(rate, int | float) else ""))
    if kind == "enhancements":
        solved = report.get("solved") or {}
        return (f"{report.get('rows_kept', 0)} of {report.get('rows_total', 0)} rows kept"
                + (f"; student {solved.get('student_alone', 0)} alone, {solved.get('student_after_hint', 0)} after "
                   f"hints, teacher {solved.get('teacher_only', 0)}" if solved else ""))
    if kind == "exports":
        return ", ".join(k for k in ("merged", "gguf", "hub") if report.get(k)) or "exported"
    steps = report.get("steps") or {}
    return " → ".join(f"{name} {info.get('status')}" for name, info in steps.items())


def read_pipeline(data_dir: Path, pipeline_id: str) -> dict[str, Any]:
    """DATA_DIR/pipelines/ID/pipeline.json (UnknownJobError when there is none)."""
    root = Path(data_dir) / "pipelines"
    path = root / pipeline_id / "pipeline.json"
    if not path.is_file() or path.parent.parent != root:
        raise UnknownJobError(pipeline_id)
    state = json.loads(path.read_text())
    if not access.can_see(state.get("owner")):
        raise UnknownJobError(pipeline_id)
    return state


def data_dir_source(data_dir: str | Path, cancel: Callable[[str], Any] | None = None) -> JobsSource:
    """A source over a data dir (the inline provider's TRL_POST_TRAINING_DIR or a service's data dir).

    Reads only: the store is opened read-only, statuses come from the store plus each run's files, the
    way the providers build their status answers."""
    data_dir = Path(data_dir).expanduser()
    db = data_dir / "jobs.db"
    if not db.exists():
        raise FileNotFoundError(f"--data-dir: {data_dir} has no jobs.db (is it a provider's data dir?)")
    store = ReadOnlyJobStore(db)

    def view(job_uuid: str) -> dict[str, Any]:
        job = store.get(job_uuid)
        files = RunFiles(job.run_dir)
        status = files.read_status()
        res = dict(job.resources)
        res.update(status.get("resources", {}))
        ranks = files.rank_reports()
        if ranks:
            res["ranks"] = ranks
        for key in ("step", "total_steps", "last_loss", "final_train_loss", "final_validation_loss"):
            if status.get(key) is not None:
                res[key] = status[key]
        if job.error:
            res["error"] = job.error
        res["run_dir"] = job.run_dir
        res.setdefault("method", job.method)
        if job.owner is not None:
            res["owner"] = job.owner
        return {"job_uuid": job.job_uuid, "status": job.status, "scheduled_at": job.scheduled_at,
                "started_at": job.started_at, "completed_at": job.completed_at, "resources_allocated": res,
                "checkpoints": status.get("checkpoints", [])}

    return JobsSource(store=store, data_dir=data_dir, view=view, cancel=cancel, kind="data-dir")


class ReadOnlyJobStore(JobStore):
    """The job store opened read-only (SQLite `mode=ro`): the dashboard never writes a provider's store."""

    def __init__(self, db_path: str | Path):  # noqa: D107 - no CREATE TABLE, no journal-mode change
        import sqlite3
        import threading

        uri = f"file:{os.path.abspath(db_path)}?mode=ro"
        self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._held: dict = {}  # what a writer holds back when its store is full: nothing, read-only
