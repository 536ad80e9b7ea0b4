"""Launchers of the service beyond this host: `slurm` (sbatch/srun) and `ray` (Ray Jobs REST API).

`local` lives with the JobManager (providers/jobs/launcher.py); `nodes` is this service's own node
registry (distributed.py), which places a job's parts on registered nodes where each runs `local`.
"""

from __future__ import annotations

import sys

from ....jobs.launcher import Launcher


class LauncherUnavailable(RuntimeError):
    """An enabled launcher cannot work on this host (its commands are missing): the service does not start."""


def build_launchers(config) -> dict[str, Launcher]:
    """The launchers the service config enables, beyond `local`."""
    cfg = config.launchers
    python = cfg.python or sys.executable
    launchers: dict[str, Launcher] = {}
    if "slurm" in cfg.enabled:
        from .slurm import SlurmLauncher

        launchers["slurm"] = SlurmLauncher(cfg.slurm, python)
    if "ray" in cfg.enabled:
        from .ray import RayLauncher

        launchers["ray"] = RayLauncher(cfg.ray, python)
    return launchers
