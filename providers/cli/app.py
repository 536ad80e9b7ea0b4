"""`trl-post-training`: submit, follow and manage post-training jobs from a terminal.

Talks to the FSDP training service or to a Llama Stack server (told apart by their health routes):

    trl-post-training submit examples/sft_lora.yaml --watch
    trl-post-training list
    trl-post-training watch JOB            # live bar: step/total, the method's headline metrics, loss, lr, ETA
    trl-post-training logs JOB -f --rank 1
    trl-post-training pipeline run examples/pipeline_teacher_students.yaml --watch
    trl-post-training sessions list        # Tinker API sessions: models, steps, loss, memory
    trl-post-training dashboard --data-dir ~/.llama/trl_post_training

`--url` (env TRL_POST_TRAINING_URL, default http://127.0.0.1:8322) and `--token` (env
TRL_POST_TRAINING_TOKEN) apply to every command. Exit codes (providers/cli/errors.py): 0 ok / accepted,
1 failed, 2 usage error or a 4xx refusal, 3 cancelled, 4 not found; an error is one line on stderr.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich import box
from rich.table import Table

from .backends import connect
from .errors import EXIT_CODES_HELP, EXIT_USAGE, CliError, run_app
from .jobfile import job_request, pipeline_request
from .sessions import sessions_app
from .watch import metric_text, watch_job, watch_pipeline
from .workflow import register_workflow_commands

DEFAULT_URL = "http://127.0.0.1:8322"

app = typer.Typer(help=__doc__.split("\n\n")[0], epilog=EXIT_CODES_HELP, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
pipeline_app = typer.Typer(help="Teacher-student pipelines (FSDP service).", epilog=EXIT_CODES_HELP,
                           no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(sessions_app, name="sessions")
console = Console()


class Ctx:
    def __init__(self, url: str, token: str | None):
        self.url, self.token = url, token
        self._backend = None

    @property
    def backend(self):
        if self._backend is None:
            self._backend = connect(self.url, self.token)
        return self._backend


def _ctx(ctx: typer.Context) -> Ctx:
    return ctx.obj


@app.callback()
def main(ctx: typer.Context,
         url: str = typer.Option(DEFAULT_URL, envvar="TRL_POST_TRAINING_URL",
                                 help="FSDP service or Llama Stack server (detected from its health route)"),
         token: Optional[str] = typer.Option(None, envvar=["TRL_POST_TRAINING_TOKEN", "TRL_FSDP_API_TOKEN"],
                                             help="bearer token of the server")) -> None:
    """Submit, follow and manage post-training jobs."""
    ctx.obj = Ctx(url, token)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


@app.command()
def submit(ctx: typer.Context, job_file: Path = typer.Argument(..., help="job YAML (see examples/)"),
           watch: bool = typer.Option(False, "--watch", "-w", help="follow the job until it ends"),
           job_uuid: Optional[str] = typer.Option(None, "--job-uuid", help="override the file's job_uuid"),
           plain: bool = typer.Option(False, "--plain", help="plain lines even on a terminal")) -> None:
    """Upload the job's data (once per content), submit the job, print its id."""
    req = job_request(job_file, job_uuid)
    b = _ctx(ctx).backend
    for ds in req.datasets:
        if ds.rows is not None and not b.has_dataset(ds.dataset_id):
            b.upload(ds.dataset_id, ds.rows)
            print(f"uploaded {len(ds.rows)} rows from {ds.path} as dataset {ds.dataset_id}", file=sys.stderr)
    uuid = b.submit(req.route, req.body)
    print(uuid, flush=True)
    if watch:
        raise typer.Exit(watch_job(b, uuid, console, plain=plain or None))


def _last(job: dict[str, Any]) -> str:
    """The method's first headline metric at its last logged step ('reward 0.625', 'margin 1.203'), else the last
    loss; `watch` and `status` show the others."""
    key, value = next(iter((job.get("last") or {}).items()), (None, None))
    return metric_text(key, value) if key else _fmt(job.get("last_loss"))


@app.command("list")
def list_jobs(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """Jobs with state, method, progress and the last value of the method's headline metric."""
    rows = _ctx(ctx).backend.jobs()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    cells = [[j["job_uuid"], j["status"], _fmt(j.get("method")),
              f"{_fmt(j.get('step'))}/{_fmt(j.get('total_steps'))}", _fmt(j.get("world_size")),
              _last(j), _fmt(j.get("final_loss")), (j.get("error") or "")[:200]] for j in rows]
    names = ("job", "status", "method", "step", "ranks", "last", "final")
    if not console.is_terminal:
        # A pipe or a file: one job per line, tab-separated and whole, for grep, cut and awk.
        for c in [[*names, "error"], *cells]:
            print("\t".join(str(v).replace("\t", " ").replace("\n", " ") for v in c), file=console.file)
        return
    # Widths are fixed here rather than left to rich, which shrinks whatever column it likes when a terminal
    # is narrow: the status and numbers stay whole, a long job name folds, the error gets what is left.
    widths = [max([len(n), *(len(str(c[i])) for c in cells)]) for i, n in enumerate(names)]
    room = console.width - sum(w + 3 for w in widths[1:]) - 5  # padding and a separator per column
    widths[0] = max(8, min(widths[0], 24, room - 3))
    left = room - widths[0] - 3
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name, width in zip(names, widths):
        t.add_column(name, width=width, overflow="fold" if name == "job" else "ellipsis")
    if left >= 12:
        t.add_column("error", width=left, no_wrap=True, overflow="ellipsis")
    else:
        cells = [c[:-1] for c in cells]  # no room: `status JOB` shows the error
    for c in cells:
        t.add_row(*c)
    console.print(t)


@app.command()
def status(ctx: typer.Context, job_uuid: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """A job's status (state, progress, resources, checkpoints)."""
    s = _ctx(ctx).backend.status(job_uuid)
    if as_json:
        print(json.dumps(s, indent=2))
        return
    res = s.get("resources_allocated") or {}
    t = Table(show_header=False, box=None)
    for key, value in (("job", s["job_uuid"]), ("status", s["status"]), ("method", res.get("method")),
                       ("model", res.get("model")), ("step", f"{_fmt(res.get('step'))}/{_fmt(res.get('total_steps'))}"),
                       ("last loss", _fmt(res.get("last_loss"))), ("final loss", _fmt(res.get("final_train_loss"))),
                       ("world size", _fmt(res.get("world_size"))), ("started", _fmt(s.get("started_at"))),
                       ("completed", _fmt(s.get("completed_at"))), ("run dir", _fmt(res.get("run_dir"))),
                       ("checkpoints", str(len(s.get("checkpoints") or []))), ("error", res.get("error") or "")):
        t.add_row(f"[bold]{key}", str(value if value is not None else "-"))
    console.print(t)


@app.command()
def artifacts(ctx: typer.Context, job_uuid: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """A job's checkpoints (with their metrics) and its plots (RUN_DIR/plots/*.png)."""
    a = _ctx(ctx).backend.artifacts(job_uuid)
    if as_json:
        print(json.dumps(a, indent=2))
        return
    names = ("checkpoint", "step", "train loss", "validation loss", "path")
    rows = [[cp.get("identifier", ""), _fmt(cp.get("step")), _fmt((cp.get("training_metrics") or {}).get("train_loss")),
             _fmt((cp.get("training_metrics") or {}).get("validation_loss")), cp.get("path", "")]
            for cp in a.get("checkpoints") or []]
    if not console.is_terminal:  # a pipe or a file: whole names and paths, tab-separated
        for row in [names, *rows]:
            print("\t".join(map(str, row)), file=console.file)
    else:
        t = Table()
        for name in names:  # names and paths fold onto a second line rather than lose their ends
            t.add_column(name, overflow="fold" if name in ("checkpoint", "path") else "ellipsis")
        for row in rows:
            t.add_row(*row)
        console.print(t)
    for p in a.get("plots") or []:
        print(f"plot {p}")


@app.command()
def cancel(ctx: typer.Context, job_uuid: str) -> None:
    """Cancel a job (every process it started stops); a job that has already ended is an error (exit 2)."""
    c = _ctx(ctx)
    state = c.backend.status(job_uuid)["status"]
    if state in ("completed", "failed", "cancelled"):
        raise CliError(f"cancel: job {job_uuid} has already ended ({state}); nothing to cancel", EXIT_USAGE)
    c.backend.cancel(job_uuid)
    print(f"{job_uuid}: {c.backend.status(job_uuid)['status']}")


@app.command()
def resume(ctx: typer.Context, job_uuid: str,
           watch: bool = typer.Option(False, "--watch", "-w")) -> None:
    """Run a failed or cancelled job again from its newest checkpoint (FSDP service)."""
    c = _ctx(ctx)
    print(f"{job_uuid}: {c.backend.resume(job_uuid)}")
    if watch:
        raise typer.Exit(watch_job(c.backend, job_uuid, console))


@app.command()
def watch(ctx: typer.Context, job_uuid: str,
          interval: float = typer.Option(1.0, help="seconds between polls"),
          plain: bool = typer.Option(False, "--plain", help="plain lines even on a terminal"),
          replay: bool = typer.Option(False, "--replay", help="a finished job: every logged step, not the summary")) -> None:
    """Follow a job: live bar with step/total, the method's headline metrics (GRPO reward per grader, DPO
    margin/accuracy, KD hard/soft loss), loss, lr, tokens/s, ETA. A job that has already ended: a summary
    (state, steps, headline metrics first -> last, final train/validation loss, duration, checkpoint), or its whole history with --replay. Exit 0 when it completes, 1 when it
    fails, 3 when it is cancelled."""
    c = _ctx(ctx)
    raise typer.Exit(watch_job(c.backend, job_uuid, console, interval, plain or None, replay))


@app.command()
def logs(ctx: typer.Context, job_uuid: str, follow: bool = typer.Option(False, "--follow", "-f"),
         rank: Optional[int] = typer.Option(None, "--rank", help="a torchrun rank's log (default: rank 0 / main)"),
         tail: int = typer.Option(100, "--tail", "-n")) -> None:
    """A job's log; -f follows it until the job ends."""
    c = _ctx(ctx)
    if not follow:
        for line in c.backend.logs(job_uuid, tail, rank):
            if (shown := readable_log_line(line)) is not None:
                print(shown)
        return

    partial = ""  # a chunk may end inside a line: it is shown when its end comes
    try:
        for chunk in c.backend.follow_logs(job_uuid, tail, rank):
            *lines, partial = (partial + chunk).split("\n")
            for line in lines:
                if (shown := readable_log_line(line)) is not None:
                    print(shown, flush=True)
        if partial and (shown := readable_log_line(partial)) is not None:
            print(shown)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


# Lines of older jobs' logs that say nothing to a job's owner (providers/quiet.py keeps them out of new ones).
LOG_NOISE = (re.compile(r"^\S+ \S+ INFO accelerate\."), re.compile(r"mtime may not be reliable"))
TRAINER_LOG = re.compile(r"^\{'[\w/]+': .*\}$")  # transformers' Trainer prints each log as a Python dict


def readable_log_line(line: str) -> str | None:
    """A job log line as `logs` shows it: the Trainer's dicts as `key value` pairs; None for noise."""
    if any(p.search(line) for p in LOG_NOISE):
        return None
    if TRAINER_LOG.match(line):
        try:
            values = ast.literal_eval(line)
        except (ValueError, SyntaxError):
            return line
        return "  ".join(f"{k} {v}" for k, v in values.items())
    return line


@app.command()
def nodes(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """The FSDP service's nodes: state, heartbeat age, load, capabilities."""
    import time

    rows = _ctx(ctx).backend.nodes()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table("node", "state", "url", "heartbeat age", "load", "cpus", "ram GB", "gpus", "models")
    now = time.time()
    for n in rows:
        cap = n.get("capabilities") or {}
        t.add_row(n["node_id"], n["state"], n["url"], f"{now - n['last_heartbeat']:.1f}s", str(n.get("load", 0)),
                  str(cap.get("cpu_cores")), str(cap.get("ram_gb")), str(len(cap.get("gpus") or [])),
                  str(len(cap.get("models") or [])))
    console.print(t)


@pipeline_app.command("run")
def pipeline_run(ctx: typer.Context, pipeline_file: Path,
                 watch: bool = typer.Option(False, "--watch", "-w", help="one progress line per task until it ends"),
                 pipeline_id: Optional[str] = typer.Option(None, "--pipeline-id"),
                 plain: bool = typer.Option(False, "--plain")) -> None:
    """Submit a teacher-student pipeline from a YAML file; print its id."""
    c = _ctx(ctx)
    body, _ = pipeline_request(pipeline_file, pipeline_id)
    pid = c.backend.submit_pipeline(body)
    print(pid, flush=True)
    if watch:
        raise typer.Exit(watch_pipeline(c.backend, pid, console, plain=plain or None))


@pipeline_app.command("status")
def pipeline_status(ctx: typer.Context, pipeline_id: str,
                    watch: bool = typer.Option(False, "--watch", "-w"), plain: bool = typer.Option(False, "--plain")) -> None:
    """A pipeline's state and its tasks'; --watch follows it."""
    c = _ctx(ctx)
    if watch:
        raise typer.Exit(watch_pipeline(c.backend, pipeline_id, console, plain=plain or None))
    print(json.dumps(c.backend.pipeline(pipeline_id), indent=2))


@app.command()
def dashboard(ctx: typer.Context,
              data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="a provider's data dir (jobs.db, runs/)"),
              host: str = typer.Option("127.0.0.1", help="bind address"),
              port: int = typer.Option(8323, help="port"),
              token: Optional[str] = typer.Option(None, "--token", envvar="TRL_DASHBOARD_TOKEN",
                                                  help="require this token; enables cancel (through --url)")) -> None:
    """Serve the dashboard for a data dir (e.g. the inline provider's TRL_POST_TRAINING_DIR).

    Read-only unless --token is set; then cancel goes through the server at --url (Llama Stack or the
    FSDP service). Without --data-dir, points at the FSDP service's own /dashboard."""
    c = _ctx(ctx)
    if data_dir is None:
        b = c.backend
        if b.kind != "fsdp-service":
            raise CliError("dashboard: a Llama Stack server serves no dashboard; pass --data-dir (its "
                           "TRL_POST_TRAINING_DIR)", EXIT_USAGE)
        print(f"The FSDP service serves its dashboard: {b.url}/dashboard/")
        return
    from .serve import serve_data_dir

    serve_data_dir(data_dir, host, port, token, c.url if token else None, c.token)


register_workflow_commands(app)  # chat, enhance, validate, export, workflow (providers/cli/workflow.py)
for _command in (*app.registered_commands, *pipeline_app.registered_commands):
    _command.epilog = _command.epilog or EXIT_CODES_HELP


def run() -> None:
    """Console entry point: errors become one line and the exit code of their outcome (errors.py)."""
    run_app(app)


if __name__ == "__main__":
    run()
