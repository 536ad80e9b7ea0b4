"""Launchers: who starts a job's processes, and where.

One registry: `LAUNCHERS` names every launcher, its class and its settings model; each lives in the module of
its name here (`local.py`, `nodes.py`, `slurm.py`, `ray.py`) and answers the questions of `base.Launcher` (does
it run the job elsewhere, what can it not honour, what it checks before a job starts). The service config's
accepted names and sections, `torch_run_config.launcher`'s pattern and the error messages all derive from this
table. Modules are imported on first use (`launcher_class`, `settings_model`), so naming a launcher costs no
import: the `nodes` launcher needs the whole service, `local` is also the inline provider's, and the service
config imports only the launchers it enables or configures.

`local` is built by the JobManager (this host, also the inline provider's); `nodes` by the service app
(it needs the node registry); the others by `build_launchers` from the service config.
"""

from __future__ import annotations

import importlib
import sys
from typing import Literal, NamedTuple


class Entry(NamedTuple):
    cls: str  # the launcher class in providers/launchers/<name>.py
    settings: str | None = None  # its settings model there: the service config's `launchers.<name>` section


LAUNCHERS: dict[str, Entry] = {
    "local": Entry("LocalLauncher"),  # this host: one process group per job
    "nodes": Entry("NodesLauncher"),  # this service's registered nodes: one local part per node
    "slurm": Entry("SlurmLauncher", "SlurmConfig"),  # sbatch; one torchrun per node under srun
    "ray": Entry("RayLauncher", "RayConfig"),  # the Ray Jobs REST API; one torchrun per node in a placement group
}
LauncherName = Literal[tuple(LAUNCHERS)]  # type: ignore[valid-type]
NAME_PATTERN = f"^({'|'.join(LAUNCHERS)})$"


def launcher_class(name: str) -> type:
    """The class of the launcher `name` (a key of LAUNCHERS)."""
    return getattr(importlib.import_module(f"{__name__}.{name}"), LAUNCHERS[name].cls)


def settings_model(name: str) -> type | None:
    """The pydantic model of launcher `name`'s config section, or None when it takes none (imports its module)."""
    entry = LAUNCHERS[name]
    return getattr(importlib.import_module(f"{__name__}.{name}"), entry.settings) if entry.settings else None


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
