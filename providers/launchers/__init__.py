"""Launchers: who starts a job's processes, and where.

One registry: `LAUNCHERS` names every launcher and its class; each lives in the module of its name here
(`local.py`, `nodes.py`, `slurm.py`, `ray.py`) and answers the questions of `base.Launcher` (does it run
the job elsewhere, what can it not honour, what it checks before a job starts). The service config's
accepted names, `torch_run_config.launcher`'s pattern and the error messages all derive from this table.
Modules are imported on first use (`launcher_class`), so naming a launcher costs no import: the `nodes`
launcher needs the whole service, `local` is also the inline provider's.

`local` is built by the JobManager (this host, also the inline provider's); `nodes` by the service app
(it needs the node registry); the others by `build_launchers` from the service config.
"""

from __future__ import annotations

import importlib
import sys
from typing import Literal

# name -> the class in providers/launchers/<name>.py
LAUNCHERS: dict[str, str] = {
    "local": "LocalLauncher",  # this host: one process group per job
    "nodes": "NodesLauncher",  # this service's registered nodes: one local part per node
    "slurm": "SlurmLauncher",  # sbatch; one torchrun per node under srun
    "ray": "RayLauncher",  # the Ray Jobs REST API; one torchrun per node in a placement group
}
LauncherName = Literal[tuple(LAUNCHERS)]  # type: ignore[valid-type]
NAME_PATTERN = f"^({'|'.join(LAUNCHERS)})$"


def launcher_class(name: str) -> type:
    """The class of the launcher `name` (a key of LAUNCHERS)."""
    return getattr(importlib.import_module(f"{__name__}.{name}"), LAUNCHERS[name])


def runs_elsewhere(name: str | None) -> bool:
    """Whether launcher `name` runs a job's processes on hosts a scheduler picks, not this one."""
    return name is not None and launcher_class(name).runs_elsewhere


def build_launchers(config) -> dict:
    """The enabled launchers that are built from the service config (those with `from_config`): the
    JobManager builds `local` itself and the app builds `nodes` (it needs the node registry)."""
    cfg = config.launchers
    python = cfg.python or sys.executable
    classes = {name: launcher_class(name) for name in cfg.enabled}
    return {name: cls.from_config(cfg, python) for name, cls in classes.items() if hasattr(cls, "from_config")}
