"""Experiment loggers: `logger_config` -> the TrainingArguments that turn on TRL's (transformers')
reporting integrations, with offline-friendly defaults inside the run directory.

    logger_config:
      report_to: [tensorboard, mlflow, trackio, wandb, ...]   # any integration transformers supports
      project: my-project        # W&B / MLflow experiment / trackio / Comet / SwanLab project
      run_name: my-run           # default: the job_uuid
      logging_steps: 1
      tensorboard: true          # shorthand for report_to: [tensorboard]
      wandb_project: p           # shorthand for report_to: [wandb], project: p

Where each logger writes unless the training host's environment says otherwise (env vars win):
tensorboard RUN_DIR/tensorboard; mlflow a file store at RUN_DIR/mlruns (MLFLOW_TRACKING_URI); trackio
RUN_DIR/trackio (TRACKIO_DIR); wandb RUN_DIR/wandb, offline when no WANDB_API_KEY is set; comet_ml
offline into RUN_DIR/comet when no COMET_API_KEY is set; dvclive and codecarbon under the run dir.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Any

from .optional_imports import bring_back

# integration name (transformers' report_to) -> the module it needs on the training host
INTEGRATIONS = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "trackio": ("trackio",),
    "comet_ml": ("comet_ml",),
    "neptune": ("neptune",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
    "codecarbon": ("codecarbon",),
    "swanlab": ("swanlab",),
    "azure_ml": ("azureml",),
    "dagshub": ("dagshub",),
    "flyte": ("flytekit",),
    "kubeflow": ("kubeflow",),
}


def installed(name: str) -> bool:
    return any(importlib.util.find_spec(m) is not None for m in INTEGRATIONS[name])


def check_report_to(value: Any) -> list[str]:
    """`logger_config.report_to` (a name or a list; "none" or [] for none) as a checked list; a
    ValueError names the field, the value and what would be accepted."""
    if value is None or value == "none":
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"logger_config.report_to: {value!r} must be a logger name or a list of them")
    if "all" in names:
        return sorted(n for n in INTEGRATIONS if installed(n))
    for n in names:
        if n not in INTEGRATIONS:
            raise ValueError(f"logger_config.report_to: unknown logger {n!r}; supported: {sorted(INTEGRATIONS)}")
        if not installed(n):
            have = sorted(k for k in INTEGRATIONS if installed(k))
            raise ValueError(f"logger_config.report_to: {n!r} needs the {INTEGRATIONS[n][0]!r} package on the "
                             f"training host (pip install {INTEGRATIONS[n][0]}); installed loggers: {have}")
    return list(dict.fromkeys(names))


def logger_args(logging_spec, job_uuid: str, run_dir: str | Path) -> dict[str, Any]:
    """TrainingArguments fields (report_to, run_name, project) for the job, after setting each chosen
    logger's environment defaults (only where the environment does not already name them)."""
    from transformers import TrainingArguments

    run_dir = Path(run_dir)
    names = list(getattr(logging_spec, "report_to", None) or [])
    if logging_spec.tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    if logging_spec.wandb_project and "wandb" not in names:
        names.append("wandb")
    project = getattr(logging_spec, "project", None) or logging_spec.wandb_project
    run_name = getattr(logging_spec, "run_name", None) or job_uuid
    env = os.environ
    for name in names:  # left out of training processes until a job uses them (optional_imports)
        for package in INTEGRATIONS.get(name, ()):
            bring_back(package)
    if "tensorboard" in names:
        env.setdefault("TENSORBOARD_LOGGING_DIR", str(run_dir / "tensorboard"))
    if "mlflow" in names:
        if "MLFLOW_TRACKING_URI" not in env:  # a file store in the run dir: offline, no server, no database
            env["MLFLOW_TRACKING_URI"] = (run_dir / "mlruns").resolve().as_uri()
            env.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants an opt-in for file stores
        if project:
            env.setdefault("MLFLOW_EXPERIMENT_NAME", project)
    if "trackio" in names:
        env.setdefault("TRACKIO_DIR", str(run_dir / "trackio"))
        import_again("trackio")  # it reads TRACKIO_DIR when imported, maybe in the zygote before this job's
    if "wandb" in names:
        env.setdefault("WANDB_DIR", str(run_dir))
        if project:
            env.setdefault("WANDB_PROJECT", project)
        if "WANDB_API_KEY" not in env:
            env.setdefault("WANDB_MODE", "offline")
    if "comet_ml" in names:
        if project:
            env.setdefault("COMET_PROJECT_NAME", project)
        if "COMET_API_KEY" not in env:
            env.setdefault("COMET_MODE", "offline")
            env.setdefault("COMET_OFFLINE_DIRECTORY", str(run_dir / "comet"))
    if "swanlab" in names and project:
        env.setdefault("SWANLAB_PROJ_NAME", project)
    if "dvclive" in names:
        env.setdefault("DVCLIVE_DIR", str(run_dir / "dvclive"))
    args: dict[str, Any] = {"report_to": names or "none", "run_name": run_name}
    if project and "project" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        args["project"] = project  # trackio reads it from the arguments
    return args


def import_again(name: str) -> None:
    """Import package `name` afresh (a process forked from a preloaded one has it as the zygote imported it,
    with the zygote's environment) and point every loaded module's reference to it at the new one."""
    old = sys.modules.get(name)
    if old is None:
        return
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
    new = importlib.import_module(name)
    for module in list(sys.modules.values()):
        if isinstance(module, types.ModuleType) and vars(module).get(name) is old:  # no lazy __getattr__
            setattr(module, name, new)
