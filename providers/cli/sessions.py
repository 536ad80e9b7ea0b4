"""`trl-post-training sessions`: the Tinker API's sessions on the FSDP service (yours; an admin's key: all)."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.table import Table

from .errors import EXIT_CODES_HELP, EXIT_USAGE, CliError

sessions_app = typer.Typer(help="Tinker API sessions (FSDP service): list them, end one.", epilog=EXIT_CODES_HELP,
                           no_args_is_help=True)


def _service(ctx: typer.Context):
    backend = ctx.obj.backend
    if not hasattr(backend, "tinker_sessions"):
        raise CliError(f"{ctx.obj.url}: Tinker sessions live on the FSDP service, not on a {backend.kind}",
                       EXIT_USAGE)
    return backend


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.1f}h"


@sessions_app.command("list")
def list_sessions(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """Each session's models: base model, LoRA rank, steps, last loss, tokens, in memory or saved, idle time."""
    sessions = _service(ctx).tinker_sessions()
    if as_json:
        print(json.dumps(sessions, indent=2))
        return
    if not sessions:
        print("no Tinker sessions", file=sys.stderr)
        return
    t = Table("session", "user", "model", "base", "rank", "steps", "last loss", "tokens", "memory", "idle")
    for s in sessions:
        models = s["models"] or [None]
        for m in models:
            t.add_row(s["session_id"], s["owner"] or "-", (m or {}).get("model_id", "-").rsplit(":", 2)[-1]
                      if m else "-", (m or {}).get("base_model", "-").rsplit("/", 1)[-1],
                      str(m["lora_rank"]) if m else "-", str(m["steps"]) if m else "-",
                      f"{m['last_loss']:.4g}" if m and m["last_loss"] is not None else "-",
                      str(m["tokens"]) if m else "-", ("resident" if m["resident"] else "saved") if m else "-",
                      _age(m["idle_s"] if m else s["idle_s"]))
    Console(width=200 if not sys.stdout.isatty() else None).print(t)


@sessions_app.command("end")
def end_session(ctx: typer.Context, session_id: str) -> None:
    """End a session: its models leave memory; their tinker:// checkpoints stay."""
    _service(ctx).end_tinker_session(session_id)
    print(f"ended session {session_id}")
