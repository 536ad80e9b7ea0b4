"""Following a job or a pipeline: a rich live progress bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column

from ..training.methods import headline_metrics
from .backends import ACTIVE

# (metrics key, short name, format) shown next to the bar when the job logs them (a training step's own
# record; the validation loss comes from evaluation records, at the steps where it was measured); the method's
# headline metrics (methods.py) come first
STATS = (
    ("reward", "reward", "{:.3f}"),
    ("loss", "loss", "{:.4f}"),
    ("learning_rate", "lr", "{:.2e}"),
    ("tokens_per_s", "tok/s", "{:,.0f}"),
    ("rewards/margins", "margin", "{:.3f}"),
    ("rewards/accuracies", "acc", "{:.2f}"),
    ("hard_loss", "hard", "{:.4f}"),
    ("soft_loss", "soft", "{:.4f}"),
)
EXIT_CODES = {"completed": 0, "failed": 1, "cancelled": 3}
RATE_WINDOW = 20  # logged steps the ETA's rate is taken over


NAMES = {key: (name, fmt) for key, name, fmt in STATS}


def metric_text(key: str, value: float) -> str:
    """'loss 1.2345', 'margin 0.120', a grader's mean reward by the grader's name ('rewards/exact/mean' -> 'exact')."""
    name, fmt = NAMES.get(key, (key.split("/")[1] if key.startswith("rewards/") else key, "{:.3f}"))
    return f"{name} {fmt.format(value)}"


def stats_text(record: dict[str, Any], method: str | None = None) -> str:
    """A training step's own figures (nothing carried over from earlier records): the method's headline
    metrics first, then the others of STATS it logs."""
    first = list(headline_metrics(method, record))
    rest = [key for key, _, _ in STATS if key not in first and isinstance(record.get(key), (int, float))]
    return "  ".join(metric_text(key, record[key]) for key in first + rest)


def first_to_last(method: str | None, records: list[dict[str, Any]]) -> list[str]:
    """Each headline metric's first and last logged training-step value: 'reward 0.250 -> 0.625'."""
    steps = [r for r in records if "loss" in r and isinstance(r.get("step"), int)]
    keys = headline_metrics(method, {k: v for r in steps for k, v in r.items()})
    out = []
    for key in keys:
        values = [r[key] for r in steps if isinstance(r.get(key), (int, float))]
        if values:
            out.append(f"{metric_text(key, values[0])} -> {metric_text(key, values[-1]).split(' ', 1)[1]}")
    return out


def duration_text(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class StepLines:
    """Plain lines for metrics records, in order: a training step ('step N/T  loss ...  eta 12s') or an
    evaluation ('eval at step N/T  val 1.2345'). The ETA appears once two timed steps give a rate, and only from
    the steps logged so far (a replay does not borrow the future's rate)."""

    def __init__(self, total: int | None = None, method: str | None = None):
        self.total = total
        self.method = method
        self.timed: deque[tuple[int, float]] = deque(maxlen=RATE_WINDOW)
        self.last_step = -1
        self.last_eval: tuple[int, float] | None = None  # (step, validation loss) last measured

    def eta_s(self, step: int) -> float | None:
        """Seconds left at the rate of the last (up to) RATE_WINDOW logged steps; None without a rate."""
        if not self.total or len(self.timed) < 2:
            return None
        (s0, t0), (s1, t1) = self.timed[0], self.timed[-1]
        if t1 <= t0 or s1 <= s0:
            return None
        return max(0.0, (self.total - step) * (t1 - t0) / (s1 - s0))

    def line(self, r: dict[str, Any]) -> str | None:
        """The line for record `r`, or None (a record that is neither a new step nor an evaluation)."""
        step = r.get("step")
        if not isinstance(step, int):
            return None
        where = f"step {step}/{self.total or '?'}"
        if isinstance(r.get("eval_loss"), (int, float)):
            if self.last_eval == (step, r["eval_loss"]):
                return None  # the final evaluation is logged twice
            self.last_eval = (step, r["eval_loss"])
            return f"eval at {where}  val {r['eval_loss']:.4f}"
        if "loss" not in r or step <= self.last_step:
            return None
        self.last_step = step
        if isinstance(r.get("time"), (int, float)):
            self.timed.append((step, r["time"]))
        eta = self.eta_s(step)
        return f"{where}  {stats_text(r, self.method)}" + (f"  eta {duration_text(eta)}" if eta is not None else "")


def summary_lines(job_uuid: str, status: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    """What a finished job came to: state, steps, its headline metrics first -> last, final train/validation
    loss, duration, checkpoint."""
    res = status.get("resources_allocated") or {}
    step = res.get("step") or max((r.get("step", 0) for r in records), default=0)
    lines = [f"{job_uuid}: {status['status']}", f"  steps        {step}/{res.get('total_steps') or '?'}"]
    for i, (name, change) in enumerate(t.split(" ", 1) for t in first_to_last(res.get("method"), records)):
        lines.append(f"  {name:<12} {change}" + ("  (first -> last logged step)" if i == 0 else ""))
    train = res.get("final_train_loss", res.get("last_loss"))
    if not isinstance(train, (int, float)):
        train = next((r["loss"] for r in reversed(records) if isinstance(r.get("loss"), (int, float))), None)
    lines.append(f"  train loss   {train:.4f}" if isinstance(train, (int, float)) else "  train loss   -")
    evals = [r for r in records if isinstance(r.get("eval_loss"), (int, float))]
    lines.append(f"  val loss     {evals[-1]['eval_loss']:.4f} (step {evals[-1].get('step')}, {len({r.get('step') for r in evals})} "
                 f"evaluation(s))" if evals else "  val loss     - (never measured)")
    from ..dashboard.sources import _seconds

    try:
        seconds = _seconds(status.get("started_at"), status.get("completed_at"))
    except (TypeError, ValueError):
        seconds = None
    if seconds is not None:
        lines.append(f"  duration     {duration_text(seconds)}")
    checkpoints = status.get("checkpoints") or []
    if checkpoints:
        lines.append(f"  checkpoint   {checkpoints[-1].get('path')}")
    return lines


def _end(job_uuid: str, state: str, res: dict[str, Any], console: Console,
         records: list[dict[str, Any]] | None = None) -> int:
    error = res.get("error")
    final = res.get("final_train_loss")
    if state == "completed":
        moved = first_to_last(res.get("method"), records or [])
        console.print(f"{job_uuid} completed" + (f": final loss {final:.4f}" if isinstance(final, float) else "")
                      + (f" ({', '.join(moved)})" if moved else ""), markup=False, highlight=False)
    else:
        Console(stderr=True).print(f"{job_uuid} {state}" + (f": {error}" if error else ""), markup=False,
                                   highlight=False)
    return EXIT_CODES.get(state, 1)


def watch_job(backend, job_uuid: str, console: Console, interval: float = 1.0, plain: bool | None = None,
              replay: bool = False) -> int:
    """Follow a job until it ends; the exit code: 0 completed, 1 failed, 3 cancelled. A job that has
    already ended gets a summary, or with `replay` its whole history line by line."""
    status = backend.status(job_uuid)
    if status["status"] not in ACTIVE and not replay:
        records, _ = backend.metrics(job_uuid, 0)
        for line in summary_lines(job_uuid, status, records):
            console.print(line, markup=False, highlight=False)
        return _end(job_uuid, status["status"], status.get("resources_allocated") or {}, console)
    plain = (not console.is_terminal) if plain is None else plain
    records: list[dict[str, Any]] = []
    offset = 0
    last_state = None
    lines = StepLines(method=(status.get("resources_allocated") or {}).get("method"))
    # The stats column gives way first on a narrow terminal (ellipsis); the bar and counts stay.
    progress = None if plain else Progress(
        TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True)), BarColumn(bar_width=24),
        MofNCompleteColumn(), TextColumn("{task.fields[eta]}"), TimeElapsedColumn(),
        TextColumn("{task.fields[stats]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
        console=console, transient=False, expand=True,
    )
    task = None
    if progress is not None:
        progress.start()
        task = progress.add_task(job_uuid, total=None, stats="", eta="")
    try:
        while True:
            state = status["status"]
            res = status.get("resources_allocated") or {}
            new, offset = backend.metrics(job_uuid, offset)
            records += new
            total = res.get("total_steps")
            lines.total = total
            printed = [text for text in map(lines.line, new) if text]
            # status.json is written at most once a second: the metrics may already be further on
            step = max(res.get("step") or 0, lines.last_step, 0)
            if progress is not None:
                desc = f"{job_uuid} [{state}]" if state != "in_progress" else job_uuid
                last_step = next((r for r in reversed(records) if "loss" in r), {})
                stats = stats_text(last_step, lines.method)
                if lines.last_eval:
                    stats += f"  val {lines.last_eval[1]:.4f} @{lines.last_eval[0]}"
                eta = lines.eta_s(step)
                progress.update(task, description=desc, completed=step, total=total, stats=stats,
                                eta=f"ETA {duration_text(eta)}" if eta is not None else "")
            else:
                if state != last_state:
                    print(f"{job_uuid}: {state}", flush=True)
                for text in printed:
                    print(text, flush=True)
            last_state = state
            if state not in ACTIVE:
                break
            time.sleep(interval)
            status = backend.status(job_uuid)
    finally:
        if progress is not None:
            progress.stop()
    return _end(job_uuid, state, res, console, records)


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
