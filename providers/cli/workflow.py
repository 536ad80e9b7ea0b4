"""Commands of the adapter workflow for the `trl-post-training` CLI (registered by providers/cli/app.py
with `register_workflow_commands(app)`), also runnable alone: `python -m providers.cli.workflow --help`.

    trl-post-training chat job:sft-1 "reverse: a b c"
    trl-post-training enhance enhance.yaml --rows qa.jsonl --id e1          # on the service
    trl-post-training enhance enhance.yaml --rows qa.jsonl --local --out e1/ --outbound-config outbound.yaml
    trl-post-training validate job:sft-1 --prompts heldout.jsonl --id v1
    trl-post-training validate ./adapter --prompts heldout.jsonl --local --out v1/
    trl-post-training export job:sft-1 --id x1 --format merged --format gguf --format hub --hub-repo m
    trl-post-training workflow workflow.yaml --rows qa.jsonl                 # enhance -> train -> validate -> export

With `--local` nothing goes through the service: models are local directories, and the endpoints a config
names and the Hub settings come from `--outbound-config` (the service's own file format), as on the service.
Exit codes (providers/cli/errors.py): 0 completed (validate: passed) or accepted with --no-wait, 1 failed
(validate: not passed), 2 usage error or a 4xx refusal, 3 cancelled, 4 not found.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any, Optional

import typer

from .errors import EXIT_CODES_HELP, EXIT_FAILED, EXIT_OK, STATE_CODES, run_app

DEFAULT_URL = "http://127.0.0.1:8322"


def _load(path: Path) -> Any:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


def _rows(path: Optional[Path]) -> Optional[list[dict]]:
    if path is None:
        return None
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    data = _load(path)
    if not isinstance(data, list):
        raise typer.BadParameter(f"{path}: expected a list of rows")
    return data


def _outbound(path: Optional[Path]):
    """--outbound-config for --local runs (the service's file format); none: no endpoints, no Hub token."""
    from ..outbound import OutboundConfig, read_outbound_config

    return read_outbound_config(str(path)) if path else OutboundConfig()


def _client(ctx: typer.Context):
    from ..remote_fsdp.client import TrainingServiceClient

    obj = ctx.obj
    url = getattr(obj, "url", None) or os.environ.get("TRL_POST_TRAINING_URL", DEFAULT_URL)
    token = getattr(obj, "token", None) or os.environ.get("TRL_POST_TRAINING_TOKEN")
    return TrainingServiceClient(url, token)


def _progress(state: dict) -> None:
    typer.echo(f"{state['id']}: {state['state']} {json.dumps(state.get('progress') or {})}", err=True)


def _finish(state: dict, ok: bool | None = None) -> None:
    """Print the task's state; exit with its outcome: 0 completed or accepted (not waited for), 1 failed
    (or, with `ok` False, completed without passing), 3 cancelled."""
    typer.echo(json.dumps(state, indent=2))
    code = STATE_CODES.get(state.get("state"), EXIT_FAILED)
    raise typer.Exit(EXIT_FAILED if code == EXIT_OK and ok is False else code)


def chat(ctx: typer.Context, model: str = typer.Argument(..., help="model dir, job:<uuid>, pipeline:<id>, ..."),
         message: str = typer.Argument(...), max_tokens: int = typer.Option(128), temperature: float = 0.0) -> None:
    """Ask a served checkpoint one question (OpenAI chat API of the service)."""
    typer.echo(_client(ctx).chat(model, [{"role": "user", "content": message}], max_tokens=max_tokens,
                                 temperature=temperature))


def enhance(ctx: typer.Context, config: Path = typer.Argument(..., help="EnhanceConfig as YAML/JSON"),
            rows: Optional[Path] = typer.Option(None, help="rows as JSONL/JSON"),
            dataset_id: Optional[str] = typer.Option(None, help="a dataset uploaded to the service"),
            id: str = typer.Option("enhance-1", "--id", help="enhancement id (service)"),
            local: bool = typer.Option(False, help="run here, not on the service"),
            out: Path = typer.Option(Path("enhanced"), help="output directory with --local (resumes if present)"),
            outbound_config: Optional[Path] = typer.Option(
                None, help="--local: YAML declaring the endpoints roles may name (format of the service's "
                           "--outbound-config)"),
            local_url: Optional[str] = typer.Option(None, help="--local: base URL for roles without an endpoint"),
            local_key_env: Optional[str] = typer.Option(None, help="--local: env variable with that URL's key"),
            wait: bool = True) -> None:
    """Student -> judge -> teacher hint -> retry over Q&A rows; writes the SFT/DPO datasets and a report.
    Roles name an `endpoint` the service's operator declared (on the service) or your --outbound-config
    declares (--local); without one, a model the service (or --local-url) serves."""
    cfg = _load(config)
    if local:
        from ..enhance import EnhanceConfig, enhance_rows

        endpoints = _outbound(outbound_config).endpoints
        report = asyncio.run(enhance_rows(_rows(rows) or [], EnhanceConfig.model_validate(cfg), out,
                                          endpoints=endpoints, local_base_url=local_url,
                                          local_api_key=os.environ.get(local_key_env) if local_key_env else None,
                                          progress=lambda c: typer.echo(json.dumps(c), err=True)))
        _finish({"state": "completed", "report": {k: v for k, v in report.items() if k != "config"}})
    state = _client(ctx).enhance_data(id, cfg, rows=_rows(rows), dataset_id=dataset_id, wait=wait, callback=_progress)
    _finish(state)


def validate(ctx: typer.Context, model: str = typer.Argument(...),
             prompts: Path = typer.Option(..., help="held-out rows (JSONL/JSON) with optional expected answers"),
             base: Optional[str] = typer.Option(None, help="base model (default: the adapter's base)"),
             id: str = typer.Option("validate-1", "--id"), match: str = "normalized",
             max_new_tokens: int = 64,
             min_pass_rate: Optional[float] = typer.Option(None, help="the bar: pass rate needed (default 0.5)"),
             alpha: float = typer.Option(0.05, help="significance of the gain over the base (one-sided exact "
                                                    "McNemar test on the same prompts)"),
             local: bool = False, out: Path = typer.Option(Path("validation"))) -> None:
    """Validation report (validation.json + validation.md) of an adapter or model against its base.
    Passed = files and inference work, the pass rate reaches the bar, and the model beats its base
    significantly on the same prompts."""
    if local:
        from ..validation import validate_model

        report = validate_model(model, str(out), _rows(prompts) or [], base_model=base, max_new_tokens=max_new_tokens,
                                match=match, min_pass_rate=min_pass_rate, alpha=alpha)
        typer.echo((out / "validation.md").read_text())
        raise typer.Exit(0 if report["passed"] else 1)
    state = _client(ctx).validate_model(id, model, _rows(prompts) or [], base_model=base, match=match,
                                        max_new_tokens=max_new_tokens, min_pass_rate=min_pass_rate, alpha=alpha,
                                        callback=_progress)
    _finish(state, None if state["state"] != "completed" else bool(state["outputs"].get("passed")))


def export(ctx: typer.Context, model: str = typer.Argument(...),
           format: list[str] = typer.Option(["merged", "gguf"], "--format", help="merged, gguf, hub (repeatable)"),
           gguf_dtype: str = "f16",
           hub_repo: Optional[str] = typer.Option(None, help="the Hub repository's name (without namespace)"),
           hub_namespace: Optional[str] = typer.Option(None, help="a namespace the operator allows (default: "
                                                                  "the first allowed one)"),
           hub_public: bool = typer.Option(False, help="a public repository (only if the operator allows it)"),
           outbound_config: Optional[Path] = typer.Option(
               None, help="--local: YAML with the Hub token variable and namespaces (format of the service's "
                          "--outbound-config); without a token: a dry run"),
           validation_id: Optional[str] = None, id: str = typer.Option("export-1", "--id"),
           local: bool = False, out: Path = typer.Option(Path("export"))) -> None:
    """Merged model, GGUF + Ollama Modelfile, Hub push (a dry run unless the operator configured a token)."""
    hub = ({"repo": hub_repo, "namespace": hub_namespace, "private": not hub_public} if hub_repo else None)
    if local:
        from ..export import export_model
        from ..export.hub import HubSettings, hub_target

        hub_local = None
        if hub:
            try:
                target = hub_target(HubSettings.model_validate(hub), _outbound(outbound_config).hub, "hub")
            except ValueError as e:
                raise typer.BadParameter(str(e)) from None
            token_env = target.pop("token_env")
            hub_local = {**target, "token": os.environ.get(token_env) if token_env else None}
        _finish({"state": "completed", "export": export_model(model, str(out), format, gguf_dtype, hub_local)})
    settings: dict[str, Any] = {"gguf_dtype": gguf_dtype, "hub": hub, "validation_id": validation_id}
    _finish(_client(ctx).export_model(id, model, format, callback=_progress, **settings))


def workflow(ctx: typer.Context, request: Path = typer.Argument(..., help="WorkflowRequest as YAML/JSON"),
             rows: Optional[Path] = typer.Option(None, help="rows (JSONL/JSON) if the file has none"),
             id: Optional[str] = typer.Option(None, "--id", help="overrides workflow_id"), wait: bool = True) -> None:
    """enhance -> train -> validate -> export in one call; prints the final state (pipeline_results.json)."""
    body = _load(request)
    if rows is not None:
        body["rows"] = _rows(rows)
    if id:
        body["workflow_id"] = id
    _finish(_client(ctx).run_workflow(body, wait=wait, callback=_progress))


COMMANDS = {"chat": chat, "enhance": enhance, "validate": validate, "export": export, "workflow": workflow}


def register_workflow_commands(app: typer.Typer) -> None:
    """Add chat, enhance, validate, export and workflow to a typer app (trl-post-training's)."""
    for name, fn in COMMANDS.items():
        app.command(name, epilog=EXIT_CODES_HELP)(fn)


standalone = typer.Typer(help="Adapter workflow commands", epilog=EXIT_CODES_HELP, no_args_is_help=True,
                         add_completion=False, pretty_exceptions_enable=False)
register_workflow_commands(standalone)

if __name__ == "__main__":
    run_app(standalone)
