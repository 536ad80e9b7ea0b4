"""Following a job or a pipeline: a rich live progress bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column

from .backends import ACTIVE

# (metrics key, short name, format) shown next to the bar when the job logs them
STATS = (
    ("loss", "loss", "{:.4f}"),
    ("eval_loss", "val", "{:.4f}"),
    ("learning_rate", "lr", "{:.2e}"),
    ("tokens_per_s", "tok/s", "{:,.0f}"),
    ("rewards/margins", "margin", "{:.3f}"),
    ("rewards/accuracies", "acc", "{:.2f}"),
    ("hard_loss", "hard", "{:.4f}"),
    ("soft_loss", "soft", "{:.4f}"),
)
EXIT_CODES = {"completed": 0, "failed": 1, "cancelled": 3}


def stats_text(latest: dict[str, Any]) -> str:
    return "  ".join(f"{name} {fmt.format(latest[key])}" for key, name, fmt in STATS
                     if isinstance(latest.get(key), (int, float)))


def eta_s(records: list[dict[str, Any]], step: int, total: int | None) -> float | None:
    """Seconds left at the rate of the last (up to) 20 logged steps."""
    timed = [r for r in records if "time" in r and "loss" in r][-20:]
    if not total or len(timed) < 2 or timed[-1]["time"] <= timed[0]["time"]:
        return None
    rate = (timed[-1]["step"] - timed[0]["step"]) / (timed[-1]["time"] - timed[0]["time"])
    return (total - step) / rate if rate > 0 else None


def watch_job(backend, job_uuid: str, console: Console, interval: float = 1.0, plain: bool | None = None) -> int:
    """Follow a job until it ends; the exit code: 0 completed, 1 failed, 3 cancelled."""
    plain = (not console.is_terminal) if plain is None else plain
    records: list[dict[str, Any]] = []
    latest: dict[str, Any] = {}
    offset = 0
    last_state = None
    last_printed_step = -1
    # The stats column gives way first on a narrow terminal (ellipsis); the bar and counts stay.
    progress = None if plain else Progress(
        TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True)), BarColumn(bar_width=24),
        MofNCompleteColumn(), TextColumn("ETA"), TimeRemainingColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[stats]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
        console=console, transient=False, expand=True,
    )
    task = None
    if progress is not None:
        progress.start()
        task = progress.add_task(job_uuid, total=None, stats="")
    try:
        while True:
            status = backend.status(job_uuid)
            state = status["status"]
            res = status.get("resources_allocated") or {}
            new, offset = backend.metrics(job_uuid, offset)
            records += new
            for r in new:
                latest.update({k: v for k, v in r.items() if isinstance(v, (int, float))})
            step = res.get("step") or max((r.get("step", 0) for r in records), default=0)
            total = res.get("total_steps")
            if progress is not None:
                desc = f"{job_uuid} [{state}]" if state != "in_progress" else job_uuid
                progress.update(task, description=desc, completed=step, total=total, stats=stats_text(latest))
            else:
                if state != last_state:
                    print(f"{job_uuid}: {state}", flush=True)
                for r in new:
                    if "loss" in r and r.get("step", -1) > last_printed_step:
                        last_printed_step = r["step"]
                        eta = eta_s(records, r["step"], total)
                        line = f"step {r['step']}/{total or '?'}  {stats_text({**latest, **r})}"
                        print(line + (f"  eta {eta:.0f}s" if eta is not None else ""), flush=True)
            last_state = state
            if state not in ACTIVE:
                break
            time.sleep(interval)
    finally:
        if progress is not None:
            progress.stop()
    error = res.get("error")
    final = res.get("final_train_loss")
    if state == "completed":
        console.print(f"{job_uuid} completed" + (f": final loss {final:.4f}" if isinstance(final, float) else ""))
    else:
        Console(stderr=True).print(f"{job_uuid} {state}" + (f": {error}" if error else ""), markup=False)
    return EXIT_CODES.get(state, 1)


def pipeline_tasks(p: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    merge = p.get("merge") or {}
    return [("teacher", p["teacher"]), *((f"student {s['name']}", s) for s in p["students"]),
            ("merge", {"status": merge.get("state", "skipped"), "step": None, "total_steps": None})]


def watch_pipeline(backend, pipeline_id: str, console: Console, interval: float = 1.0,
                   plain: bool | None = None) -> int:
    """Follow a pipeline, one progress line per task; exit 0 when it completes, 1 otherwise."""
    plain = (not console.is_terminal) if plain is None else plain
    progress = None if plain else Progress(
        TextColumn("{task.description:<24}"), TextColumn("{task.fields[state]:<12}"), BarColumn(),
        MofNCompleteColumn(), TextColumn("{task.fields[info]}"), console=console,
    )
    tasks: dict[str, Any] = {}
    seen: dict[str, str] = {}
    if progress is not None:
        progress.start()
    try:
        while True:
            p = backend.pipeline(pipeline_id)
            for name, t in pipeline_tasks(p):
                state = t.get("status") or "scheduled"
                info = " ".join(x for x in (f"node {t['node_id']}" if t.get("node_id") else "",
                                             f"loss {t['last_loss']:.4f}" if isinstance(t.get("last_loss"), float) else "")
                                if x)
                if progress is not None:
                    if name not in tasks:
                        tasks[name] = progress.add_task(name, total=None, state=state, info=info)
                    done = t.get("step") or (1 if state == "completed" and not t.get("total_steps") else 0)
                    total = t.get("total_steps") or (1 if state == "completed" else None)
                    progress.update(tasks[name], completed=done, total=total, state=state, info=info)
                else:
                    line = f"{name}: {state}" + (f" {t.get('step')}/{t.get('total_steps')}" if t.get("total_steps") else "")
                    if seen.get(name) != line:
                        seen[name] = line
                        print(f"{pipeline_id} {line}", flush=True)
            if p["state"] not in ACTIVE:
                break
            time.sleep(interval)
    finally:
        if progress is not None:
            progress.stop()
    if p["state"] == "completed":
        console.print(f"pipeline {pipeline_id} completed" + (f": merged adapter in {p['merge']['output']}"
                                                            if (p.get("merge") or {}).get("state") == "completed" else ""))
        return 0
    print(f"pipeline {pipeline_id} {p['state']}: {p.get('error') or ''}", file=sys.stderr)
    return EXIT_CODES.get(p["state"], 1)
